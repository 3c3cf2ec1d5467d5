//! The RPC book: every accepted RPC and where it is in its life, per-device
//! queues, device presence, deadlines. Sans-IO (times are epoch ms passed
//! in; no files, no Kafka): the RPC service (`control::rpc`) feeds it
//! requests and shard reports, persists the log records it emits *before*
//! acting on anything else it emits, publishes the status records and sends
//! the executions to the shards.
//!
//! Invariants:
//! * an `rpc_id` is executed at most once: a duplicate is answered with the
//!   RPC's current status, never queued again;
//! * per device, RPCs go to the device one at a time in acceptance order,
//!   and only while the device is reported reachable;
//! * `sent` is logged before the execution leaves the book; after a restart
//!   an RPC logged `sent` without a final status ends `failed` (outcome
//!   unknown) instead of running twice, a `queued` one resumes;
//! * every accepted RPC ends in exactly one terminal status: `succeeded`,
//!   `failed`, `timed_out`, or `expired` (its timeout passed before it
//!   could be sent).

use crate::proto::lwm2m::dm::Op;
use crate::proto::lwm2m::firmware::{FirmwarePlan, FirmwareUpdate, FwImage, UriBases};
use crate::proto::lwm2m::rpc::{
    PresenceOrder, PresenceState, RpcEvent, RpcExec, RpcOutcome, RpcRequest, RpcStatus,
};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

/// One RPC as the book keeps it (and as `GET /v1/rpc/{id}` shows it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RpcRecord {
    #[serde(serialize_with = "arc_str")]
    pub rpc_id: Arc<str>,
    pub tenant_id: String,
    pub device_id: String,
    pub endpoint: String,
    pub method: String,
    pub params: serde_json::Value,
    pub status: RpcStatus,
    pub accepted_at: i64,
    pub deadline: i64,
    pub updated_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Where a multi-step RPC is (a firmware update's bytes, percent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<serde_json::Value>,
    #[serde(skip)]
    op: Option<Work>,
    /// The status last published (a handed-back RPC sent again is not
    /// announced `sent` twice).
    #[serde(skip)]
    published: Option<RpcStatus>,
}

/// What an RPC does on the device.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// One LwM2M operation.
    Op(Op),
    /// A firmware update: a walk of object 5 ([`FirmwareUpdate`]).
    Firmware(Box<FirmwarePlan>),
}

/// A request resolved to (the device's endpoint, what it does), or why it
/// cannot run.
pub type Resolved = Result<(String, Work), String>;

fn arc_str<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

/// What the log must hold before the book's other outputs are acted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum LogRecord {
    /// Accepted, with everything needed to resolve it again after a restart.
    Accepted {
        request: RpcRequest,
        endpoint: String,
        accepted_at: i64,
        deadline: i64,
    },
    Sent {
        rpc_id: String,
        at: i64,
    },
    /// Back in its queue, never transmitted (the shard handed it back).
    Requeued {
        rpc_id: String,
    },
    Finished {
        rpc_id: String,
        status: RpcStatus,
        code: Option<String>,
        response: Option<serde_json::Value>,
        reason: Option<String>,
        at: i64,
    },
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Already known: its record as it is now (nothing is done again).
    Duplicate(Box<RpcRecord>),
    /// Malformed beyond a status (no usable rpc_id / tenant): only logged.
    Invalid(String),
}

pub struct RpcBook {
    records: HashMap<Arc<str>, RpcRecord>,
    /// The records of each device, by (accepted_at, rpc_id).
    by_device: HashMap<String, BTreeSet<(i64, Arc<str>)>>,
    /// Queued RPCs per device, in acceptance order.
    queues: HashMap<String, VecDeque<Arc<str>>>,
    /// The RPC each device is executing, and the presence report it was
    /// dispatched on.
    inflight: HashMap<String, (Arc<str>, PresenceOrder)>,
    presence: HashMap<Box<str>, PresenceState>,
    deadlines: BinaryHeap<Reverse<(i64, Arc<str>)>>,
    /// Terminal records kept this long for duplicates and the API...
    retention_ms: i64,
    /// ...and at most this many (at 10,000 RPC/s an hour would be 36M).
    max_finished: usize,
    finished: VecDeque<(i64, Arc<str>)>,
    log: VecDeque<LogRecord>,
    statuses: VecDeque<RpcRecord>,
    execs: VecDeque<(u16, RpcExec)>,
    /// Firmware updates in flight, by rpc_id.
    jobs: HashMap<Arc<str>, FirmwareUpdate>,
    /// Images the shards serve, and how many jobs use each.
    serving: HashMap<Arc<str>, (FwImage, usize)>,
    serves: VecDeque<(Arc<str>, Option<FwImage>)>,
    fw_bases: UriBases,
    fw_poll_ms: i64,
}

impl RpcBook {
    pub fn new(retention_ms: i64) -> RpcBook {
        RpcBook {
            records: HashMap::new(),
            by_device: HashMap::new(),
            queues: HashMap::new(),
            inflight: HashMap::new(),
            presence: HashMap::new(),
            deadlines: BinaryHeap::new(),
            retention_ms,
            max_finished: 200_000,
            finished: VecDeque::new(),
            log: VecDeque::new(),
            statuses: VecDeque::new(),
            execs: VecDeque::new(),
            jobs: HashMap::new(),
            serving: HashMap::new(),
            serves: VecDeque::new(),
            fw_bases: UriBases::default(),
            fw_poll_ms: 30_000,
        }
    }

    /// Where the gateway serves firmware images, and how long a firmware
    /// update waits without news before it reads /5/0.
    pub fn set_firmware(&mut self, bases: UriBases, poll_ms: i64) {
        self.fw_bases = bases;
        self.fw_poll_ms = poll_ms.max(100);
    }

    /// Keeps at most `n` finished records (oldest dropped first).
    pub fn set_max_finished(&mut self, n: usize) {
        self.max_finished = n.max(1);
    }

    // ------------------------------------------------------------ queries

    pub fn get(&self, rpc_id: &str) -> Option<&RpcRecord> {
        self.records.get(rpc_id)
    }

    /// The RPCs of a device known to the book, oldest first.
    pub fn of_device(&self, device_id: &str) -> Vec<&RpcRecord> {
        self.by_device
            .get(device_id)
            .into_iter()
            .flatten()
            .filter_map(|(_, id)| self.records.get(id))
            .collect()
    }

    fn insert(&mut self, rec: RpcRecord) {
        self.remove(&rec.rpc_id);
        self.by_device
            .entry(rec.device_id.clone())
            .or_default()
            .insert((rec.accepted_at, rec.rpc_id.clone()));
        self.records.insert(rec.rpc_id.clone(), rec);
    }

    fn remove(&mut self, id: &Arc<str>) {
        let Some(r) = self.records.remove(id) else {
            return;
        };
        if let Some(set) = self.by_device.get_mut(&r.device_id) {
            set.remove(&(r.accepted_at, r.rpc_id));
            if set.is_empty() {
                self.by_device.remove(&r.device_id);
            }
        }
    }

    pub fn presence(&self, device_id: &str) -> Option<&PresenceState> {
        self.presence.get(device_id)
    }

    /// RPCs not yet finished.
    pub fn pending(&self) -> usize {
        self.records
            .values()
            .filter(|r| !r.status.is_terminal())
            .count()
    }

    // ------------------------------------------------------------ outputs

    /// The next record to append to the log (before any other output).
    pub fn poll_log(&mut self) -> Option<LogRecord> {
        self.log.pop_front()
    }

    /// The next status to publish on `device.rpc.status.{tenant}`.
    pub fn poll_status(&mut self) -> Option<RpcRecord> {
        self.statuses.pop_front()
    }

    /// The next execution for shard `.0`.
    pub fn poll_exec(&mut self) -> Option<(u16, RpcExec)> {
        self.execs.pop_front()
    }

    /// An image the shards must start (`Some`) or stop (`None`) serving.
    pub fn poll_serve(&mut self) -> Option<(Arc<str>, Option<FwImage>)> {
        self.serves.pop_front()
    }

    /// Firmware updates in flight.
    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }

    /// The next deadline (epoch ms).
    pub fn poll_timeout(&mut self) -> Option<i64> {
        let jobs = self.jobs.values().filter_map(|j| j.poll_timeout()).min();
        let mut next = None;
        while let Some(Reverse((at, id))) = self.deadlines.peek().cloned() {
            match self.records.get(&id) {
                Some(r) if r.deadline == at && !r.status.is_terminal() => {
                    next = Some(at);
                    break;
                }
                _ => {
                    self.deadlines.pop();
                }
            }
        }
        let next = next.or_else(|| self.finished.front().map(|(at, _)| at + self.retention_ms));
        match (next, jobs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ------------------------------------------------------------ inputs

    /// A request resolved by the caller to the device's endpoint and the
    /// operation (`Err`: why it cannot run; it ends `failed` at once,
    /// nothing is sent). `default_timeout_ms` applies when the request has
    /// none.
    pub fn handle_request(
        &mut self,
        now: i64,
        req: RpcRequest,
        resolved: Resolved,
        default_timeout_ms: u64,
    ) -> Result<&RpcRecord, Refusal> {
        if let Some(r) = self.records.get(req.rpc_id.as_str()) {
            return Err(Refusal::Duplicate(Box::new(r.clone())));
        }
        if req.rpc_id.is_empty() || req.tenant_id.is_empty() || req.device_id.is_empty() {
            return Err(Refusal::Invalid(
                "rpc_id, tenant_id and device_id are required".into(),
            ));
        }
        let timeout = req.timeout_ms.unwrap_or(default_timeout_ms).max(1) as i64;
        let deadline = now.saturating_add(timeout);
        let (endpoint, op, reason) = match resolved {
            Ok((ep, op)) => (ep, Some(op), None),
            Err(e) => (String::new(), None, Some(e)),
        };
        let id: Arc<str> = Arc::from(req.rpc_id.as_str());
        self.log.push_back(LogRecord::Accepted {
            request: req.clone(),
            endpoint: endpoint.clone(),
            accepted_at: now,
            deadline,
        });
        let rec = RpcRecord {
            rpc_id: id.clone(),
            tenant_id: req.tenant_id,
            device_id: req.device_id.clone(),
            endpoint,
            method: req.method,
            params: req.params,
            status: RpcStatus::Queued,
            accepted_at: now,
            deadline,
            updated_at: now,
            code: None,
            response: None,
            reason: None,
            progress: None,
            op,
            published: None,
        };
        self.insert(rec);
        match reason {
            Some(r) => {
                // Refused before anything is sent: a terminal status, so
                // the caller sees why.
                self.finish(now, &id, RpcOutcome::failed(r));
            }
            None => {
                self.status(&id);
                self.deadlines.push(Reverse((deadline, id.clone())));
                self.queues
                    .entry(req.device_id.clone())
                    .or_default()
                    .push_back(id.clone());
                self.dispatch(now, &req.device_id);
            }
        }
        self.records
            .get(&id)
            .ok_or_else(|| Refusal::Invalid("lost".into()))
    }

    /// A report from a shard.
    pub fn handle_event(&mut self, now: i64, e: RpcEvent) {
        match e {
            RpcEvent::Presence(p) => {
                let newer = self
                    .presence
                    .get(p.device_id.as_str())
                    .is_none_or(|old| p.order >= old.order);
                if !newer {
                    return;
                }
                let dev = p.device_id.clone();
                if let Some(job) = self.job_of(&dev) {
                    if let Some(j) = self.jobs.get_mut(&job) {
                        j.handle_presence(now, &p.registration_id, p.online);
                    }
                }
                self.presence
                    .insert(dev.clone().into_boxed_str(), PresenceState::from(p));
                self.dispatch(now, &dev);
            }
            RpcEvent::Returned { rpc_id } if self.jobs.contains_key(&rpc_id) => {
                let Some(dev) = self.records.get(&rpc_id).map(|r| r.device_id.clone()) else {
                    return;
                };
                if let Some(j) = self.jobs.get_mut(&rpc_id) {
                    j.handle_returned();
                }
                let sent_on = self.inflight.get(&dev).map(|(_, o)| *o);
                match self.presence.get_mut(dev.as_str()) {
                    Some(p) if sent_on.is_some_and(|o| p.order > o) => self.dispatch(now, &dev),
                    Some(p) => p.reachable = false,
                    None => {}
                }
            }
            RpcEvent::Done { rpc_id, outcome } if self.jobs.contains_key(&rpc_id) => {
                if let Some(j) = self.jobs.get_mut(&rpc_id) {
                    j.handle_done(now, &outcome);
                }
                self.job_moved(now, &rpc_id);
            }
            RpcEvent::Notified { rpc_id, values } => {
                if let Some(j) = self.jobs.get_mut(&rpc_id) {
                    j.handle_values(now, &values);
                    self.job_moved(now, &rpc_id);
                }
            }
            RpcEvent::Progress {
                device_id,
                rpc_id,
                image,
                bytes,
            } => {
                let id = match rpc_id {
                    Some(id) => Some(id),
                    None => self.job_of(&device_id).filter(|id| {
                        self.jobs.get(id).is_some_and(|j| {
                            j.plan().served_image().map(|i| &i.name) == image.as_ref()
                        })
                    }),
                };
                if let Some(id) = id {
                    if let Some(j) = self.jobs.get_mut(&id) {
                        j.handle_progress(now, bytes);
                        self.job_moved(now, &id);
                    }
                }
            }
            RpcEvent::Returned { rpc_id } => {
                let Some(r) = self.records.get_mut(&rpc_id) else {
                    return;
                };
                if r.status != RpcStatus::Sent {
                    return;
                }
                // Never transmitted: back to the head of its queue.
                r.status = RpcStatus::Queued;
                let dev = r.device_id.clone();
                let sent_on = match self.inflight.get(&dev) {
                    Some((id, order)) if *id == rpc_id => {
                        let o = *order;
                        self.inflight.remove(&dev);
                        Some(o)
                    }
                    _ => None,
                };
                self.log.push_back(LogRecord::Requeued {
                    rpc_id: rpc_id.to_string(),
                });
                self.queues
                    .entry(dev.clone())
                    .or_default()
                    .push_front(rpc_id);
                // A report newer than the one it went out on (the device
                // moved shard, re-registered) still stands: send it there.
                // Otherwise the shard knows better: wait for its next report.
                match self.presence.get_mut(dev.as_str()) {
                    Some(p) if sent_on.is_some_and(|o| p.order > o) => {
                        self.dispatch(now, &dev);
                    }
                    Some(p) => p.reachable = false,
                    None => {}
                }
            }
            RpcEvent::Done { rpc_id, outcome } => {
                let Some(dev) = self.records.get(&rpc_id).map(|r| r.device_id.clone()) else {
                    return;
                };
                if self.inflight.get(&dev).is_some_and(|(id, _)| *id == rpc_id) {
                    self.inflight.remove(&dev);
                }
                self.finish(now, &rpc_id, outcome);
                self.dispatch(now, &dev);
            }
        }
    }

    /// Deadlines: a queued RPC whose timeout passed ends `expired`; one in
    /// flight is left to the shard (it times out there and reports), except
    /// a firmware update, which ends `timed_out` here wherever it is.
    pub fn handle_timeout(&mut self, now: i64) {
        let polls: Vec<Arc<str>> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.poll_timeout().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in polls {
            if let Some(j) = self.jobs.get_mut(&id) {
                j.handle_timeout(now);
            }
            self.job_moved(now, &id);
        }
        while let Some(Reverse((at, id))) = self.deadlines.peek().cloned() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(r) = self.records.get(&id) else {
                continue;
            };
            if r.deadline != at {
                continue;
            }
            if let Some(j) = self.jobs.get(&id) {
                let o = j.timed_out();
                self.end_job(now, &id, o);
                continue;
            }
            if r.status != RpcStatus::Queued {
                continue;
            }
            let dev = r.device_id.clone();
            if let Some(q) = self.queues.get_mut(&dev) {
                q.retain(|x| *x != id);
            }
            self.finish(
                now,
                &id,
                RpcOutcome {
                    status: RpcStatus::Expired,
                    code: None,
                    response: None,
                    reason: Some(
                        "not delivered within timeout_ms (device offline or asleep)".into(),
                    ),
                },
            );
        }
        while let Some((at, id)) = self.finished.front().cloned() {
            if at + self.retention_ms > now && self.finished.len() <= self.max_finished {
                break;
            }
            self.finished.pop_front();
            if self
                .records
                .get(&id)
                .is_some_and(|r| r.status.is_terminal())
            {
                self.remove(&id);
            }
        }
    }

    // ------------------------------------------------------------ replay

    /// Rebuilds the book from its log after a restart. `resolve` turns a
    /// request into its operation again (profiles may have changed).
    /// Returns how many RPCs resumed and how many ended as interrupted.
    pub fn replay(
        &mut self,
        now: i64,
        records: impl IntoIterator<Item = LogRecord>,
        resolve: &dyn Fn(&RpcRequest) -> Resolved,
    ) -> (usize, usize) {
        let mut order: Vec<Arc<str>> = Vec::new();
        for rec in records {
            match rec {
                LogRecord::Accepted {
                    request,
                    endpoint,
                    accepted_at,
                    deadline,
                } => {
                    let id: Arc<str> = Arc::from(request.rpc_id.as_str());
                    let op = resolve(&request).ok().map(|(_, op)| op);
                    order.push(id.clone());
                    self.insert(RpcRecord {
                        rpc_id: id,
                        tenant_id: request.tenant_id,
                        device_id: request.device_id,
                        endpoint,
                        method: request.method,
                        params: request.params,
                        status: RpcStatus::Queued,
                        accepted_at,
                        deadline,
                        updated_at: accepted_at,
                        code: None,
                        response: None,
                        reason: None,
                        progress: None,
                        op,
                        published: None,
                    });
                }
                LogRecord::Sent { rpc_id, at } => {
                    if let Some(r) = self.records.get_mut(rpc_id.as_str()) {
                        r.status = RpcStatus::Sent;
                        r.updated_at = at;
                    }
                }
                LogRecord::Requeued { rpc_id } => {
                    if let Some(r) = self.records.get_mut(rpc_id.as_str()) {
                        r.status = RpcStatus::Queued;
                    }
                }
                LogRecord::Finished {
                    rpc_id,
                    status,
                    code,
                    response,
                    reason,
                    at,
                } => {
                    if let Some(r) = self.records.get_mut(rpc_id.as_str()) {
                        r.status = status;
                        r.code = code;
                        r.response = response;
                        r.reason = reason;
                        r.updated_at = at;
                        self.finished.push_back((at, r.rpc_id.clone()));
                    }
                }
            }
        }
        let (mut resumed, mut interrupted) = (0, 0);
        for id in order {
            let Some(r) = self.records.get(&id) else {
                continue;
            };
            match r.status {
                RpcStatus::Queued if r.op.is_some() => {
                    resumed += 1;
                    let dev = r.device_id.clone();
                    self.deadlines.push(Reverse((r.deadline, id.clone())));
                    self.queues.entry(dev).or_default().push_back(id);
                }
                RpcStatus::Queued => {
                    interrupted += 1;
                    self.finish(
                        now,
                        &id,
                        RpcOutcome::failed("after a restart its method no longer resolves"),
                    );
                }
                RpcStatus::Sent => {
                    interrupted += 1;
                    self.finish(
                        now,
                        &id,
                        RpcOutcome::failed(
                            "the gateway restarted after sending it and before the device answered; the outcome is unknown",
                        ),
                    );
                }
                _ => {}
            }
        }
        self.handle_timeout(now);
        (resumed, interrupted)
    }

    /// The log as it must be after compaction: what replays to the current
    /// state (unfinished RPCs and finished ones still retained).
    pub fn compacted(&self) -> Vec<LogRecord> {
        let mut recs: Vec<&RpcRecord> = self.records.values().collect();
        recs.sort_by_key(|r| (r.accepted_at, r.rpc_id.clone()));
        let mut out = Vec::with_capacity(recs.len() * 2);
        for r in recs {
            out.push(LogRecord::Accepted {
                request: RpcRequest {
                    rpc_id: r.rpc_id.to_string(),
                    tenant_id: r.tenant_id.clone(),
                    device_id: r.device_id.clone(),
                    method: r.method.clone(),
                    params: r.params.clone(),
                    timeout_ms: Some((r.deadline - r.accepted_at).max(1) as u64),
                },
                endpoint: r.endpoint.clone(),
                accepted_at: r.accepted_at,
                deadline: r.deadline,
            });
            match r.status {
                RpcStatus::Queued => {}
                RpcStatus::Sent
                | RpcStatus::Downloading
                | RpcStatus::Downloaded
                | RpcStatus::Updating => out.push(LogRecord::Sent {
                    rpc_id: r.rpc_id.to_string(),
                    at: r.updated_at,
                }),
                s => out.push(LogRecord::Finished {
                    rpc_id: r.rpc_id.to_string(),
                    status: s,
                    code: r.code.clone(),
                    response: r.response.clone(),
                    reason: r.reason.clone(),
                    at: r.updated_at,
                }),
            }
        }
        out
    }

    // ------------------------------------------------------------ internals

    fn status(&mut self, id: &Arc<str>) {
        if let Some(r) = self.records.get_mut(id) {
            if r.published == Some(r.status) {
                return;
            }
            r.published = Some(r.status);
            self.statuses.push_back(r.clone());
        }
    }

    fn finish(&mut self, now: i64, id: &Arc<str>, o: RpcOutcome) {
        let Some(r) = self.records.get_mut(id) else {
            return;
        };
        if r.status.is_terminal() {
            return;
        }
        r.status = o.status;
        r.code = o.code;
        r.response = o.response;
        r.reason = o.reason;
        r.updated_at = now;
        r.op = None;
        self.log.push_back(LogRecord::Finished {
            rpc_id: id.to_string(),
            status: r.status,
            code: r.code.clone(),
            response: r.response.clone(),
            reason: r.reason.clone(),
            at: now,
        });
        self.finished.push_back((now, id.clone()));
        self.status(id);
    }

    /// Sends the device's next RPC when it is reachable and idle (for a
    /// firmware update in flight: its next operation).
    fn dispatch(&mut self, now: i64, device_id: &str) {
        if let Some((id, _)) = self.inflight.get(device_id) {
            let id = id.clone();
            if self.jobs.contains_key(&id) {
                self.step_job(now, device_id, &id);
            }
            return;
        }
        let Some(p) = self.presence.get(device_id) else {
            return;
        };
        if !(p.online && p.reachable) {
            return;
        }
        let (shard, endpoint, order) = (p.shard, p.endpoint.clone(), p.order);
        let (registration, dtls) = (p.registration_id.clone(), p.dtls);
        loop {
            let Some(id) = self.queues.get_mut(device_id).and_then(|q| q.pop_front()) else {
                return;
            };
            let Some(r) = self.records.get_mut(&id) else {
                continue;
            };
            if r.status != RpcStatus::Queued {
                continue;
            }
            let Some(work) = r.op.clone() else { continue };
            r.status = RpcStatus::Sent;
            r.updated_at = now;
            let deadline = r.deadline;
            self.log.push_back(LogRecord::Sent {
                rpc_id: id.to_string(),
                at: now,
            });
            self.inflight
                .insert(device_id.to_string(), (id.clone(), order));
            self.status(&id);
            match work {
                Work::Op(op) => {
                    self.execs.push_back((
                        shard,
                        RpcExec {
                            rpc_id: id,
                            endpoint,
                            op,
                            deadline_ms: deadline,
                            job: false,
                        },
                    ));
                    // The shard reports again when it is ready for the next one.
                    if let Some(p) = self.presence.get_mut(device_id) {
                        p.reachable = false;
                    }
                }
                Work::Firmware(plan) => {
                    let started = FirmwareUpdate::start(
                        now,
                        *plan,
                        &registration,
                        dtls,
                        &self.fw_bases,
                        self.fw_poll_ms,
                    );
                    match started {
                        Ok(job) => {
                            if let Some(img) = job.plan().served_image() {
                                let e = self
                                    .serving
                                    .entry(img.name.clone())
                                    .or_insert_with(|| (img.image.clone(), 0));
                                if e.1 == 0 || e.0 != img.image {
                                    e.0 = img.image.clone();
                                    self.serves
                                        .push_back((img.name.clone(), Some(img.image.clone())));
                                }
                                e.1 += 1;
                            }
                            self.jobs.insert(id.clone(), job);
                            self.step_job(now, device_id, &id);
                        }
                        Err(e) => {
                            self.inflight.remove(device_id);
                            self.finish(now, &id, RpcOutcome::failed(e));
                            continue;
                        }
                    }
                }
            }
            return;
        }
    }

    /// The RPC of a firmware update in flight on `device_id`.
    fn job_of(&self, device_id: &str) -> Option<Arc<str>> {
        self.inflight
            .get(device_id)
            .map(|(id, _)| id.clone())
            .filter(|id| self.jobs.contains_key(id))
    }

    /// Sends the job's next operation when the device is reachable, then
    /// takes what the job decided.
    fn step_job(&mut self, now: i64, device_id: &str, id: &Arc<str>) {
        if let Some(p) = self.presence.get(device_id) {
            if p.online && p.reachable {
                let (shard, endpoint, order) = (p.shard, p.endpoint.clone(), p.order);
                let deadline = self.records.get(id).map_or(now, |r| r.deadline);
                let op = self.jobs.get_mut(id).and_then(|j| j.poll_op());
                if let Some(op) = op {
                    self.execs.push_back((
                        shard,
                        RpcExec {
                            rpc_id: id.clone(),
                            endpoint,
                            op,
                            deadline_ms: deadline,
                            job: true,
                        },
                    ));
                    self.inflight
                        .insert(device_id.to_string(), (id.clone(), order));
                    if let Some(p) = self.presence.get_mut(device_id) {
                        p.reachable = false;
                    }
                }
            }
        }
        self.drain_job(now, id);
    }

    /// The job took an input: publish its statuses, end it or send its
    /// next operation.
    fn job_moved(&mut self, now: i64, id: &Arc<str>) {
        let Some(dev) = self.records.get(id).map(|r| r.device_id.clone()) else {
            return;
        };
        if self.inflight.get(&dev).is_some_and(|(x, _)| x == id) {
            self.step_job(now, &dev, id);
        } else {
            self.drain_job(now, id);
        }
    }

    fn drain_job(&mut self, now: i64, id: &Arc<str>) {
        let Some(j) = self.jobs.get_mut(id) else {
            return;
        };
        let mut statuses = Vec::new();
        while let Some(p) = j.poll_status() {
            statuses.push(p);
        }
        let outcome = j.poll_outcome();
        for p in statuses {
            if let Some(r) = self.records.get_mut(id) {
                if r.status.is_terminal() {
                    break;
                }
                r.status = p.status;
                r.progress = Some(p.progress);
                r.updated_at = now;
                r.published = Some(r.status);
                self.statuses.push_back(r.clone());
            }
        }
        if let Some(o) = outcome {
            self.end_job(now, id, o);
        }
    }

    /// A firmware update ended: its image is no longer served for it, the
    /// device's queue moves on.
    fn end_job(&mut self, now: i64, id: &Arc<str>, o: RpcOutcome) {
        let Some(job) = self.jobs.remove(id) else {
            return;
        };
        if let Some(img) = job.plan().served_image() {
            if let Some(e) = self.serving.get_mut(&img.name) {
                e.1 = e.1.saturating_sub(1);
                if e.1 == 0 {
                    self.serving.remove(&img.name);
                    self.serves.push_back((img.name.clone(), None));
                }
            }
        }
        let Some(dev) = self.records.get(id).map(|r| r.device_id.clone()) else {
            return;
        };
        if self.inflight.get(&dev).is_some_and(|(x, _)| x == id) {
            self.inflight.remove(&dev);
        }
        self.finish(now, id, o);
        self.dispatch(now, &dev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::lwm2m::content::ResourcePath;
    use crate::proto::lwm2m::rpc::Presence;

    fn req(id: &str, dev: &str) -> RpcRequest {
        RpcRequest {
            rpc_id: id.into(),
            tenant_id: "acme".into(),
            device_id: dev.into(),
            method: "reboot".into(),
            params: serde_json::Value::Null,
            timeout_ms: Some(10_000),
        }
    }

    fn reboot() -> Op {
        Op::Execute {
            path: ResourcePath::parse("/3/0/4").unwrap(),
            args: None,
        }
    }

    fn presence(dev: &str, shard: u16, order: u64, online: bool, reachable: bool) -> RpcEvent {
        RpcEvent::Presence(Presence {
            device_id: dev.into(),
            tenant_id: "acme".into(),
            endpoint: format!("ep-{dev}").into(),
            shard,
            order: (order, shard, 0),
            online,
            reachable,
            registration_id: String::new(),
            address: String::new(),
            lwm2m_version: "1.1",
            binding: "U".into(),
            lifetime_s: 60,
            queue_mode: false,
            registered_at: 0,
            last_seen: 0,
            reason: None,
        })
    }

    fn statuses(b: &mut RpcBook) -> Vec<(String, RpcStatus)> {
        std::iter::from_fn(|| b.poll_status())
            .map(|r| (r.rpc_id.to_string(), r.status))
            .collect()
    }

    fn done(id: &str, status: RpcStatus) -> RpcEvent {
        RpcEvent::Done {
            rpc_id: Arc::from(id),
            outcome: RpcOutcome {
                status,
                code: Some("2.04".into()),
                response: None,
                reason: None,
            },
        }
    }

    fn ok(dev: &str) -> Resolved {
        Ok((format!("ep-{dev}"), Work::Op(reboot())))
    }

    #[test]
    fn offline_device_gets_its_rpcs_in_order_after_registering() {
        let mut b = RpcBook::new(60_000);
        b.handle_request(0, req("a", "d1"), ok("d1"), 60_000)
            .unwrap();
        b.handle_request(1, req("b", "d1"), ok("d1"), 60_000)
            .unwrap();
        assert!(b.poll_exec().is_none(), "offline: nothing sent");
        assert_eq!(
            statuses(&mut b),
            vec![
                ("a".into(), RpcStatus::Queued),
                ("b".into(), RpcStatus::Queued)
            ]
        );
        b.handle_event(5, presence("d1", 1, 10, true, true));
        let (shard, e) = b.poll_exec().unwrap();
        assert_eq!((shard, &*e.rpc_id, &*e.endpoint), (1, "a", "ep-d1"));
        assert!(b.poll_exec().is_none(), "one at a time");
        b.handle_event(6, done("a", RpcStatus::Succeeded));
        assert!(
            b.poll_exec().is_none(),
            "waits for the shard to say it is ready"
        );
        b.handle_event(6, presence("d1", 1, 10, true, true));
        assert_eq!(&*b.poll_exec().unwrap().1.rpc_id, "b");
        // The log has Sent before anything left.
        let log: Vec<LogRecord> = std::iter::from_fn(|| b.poll_log()).collect();
        assert!(matches!(log[2], LogRecord::Sent { ref rpc_id, .. } if rpc_id == "a"));
    }

    #[test]
    fn duplicates_expiry_and_refusals() {
        let mut b = RpcBook::new(60_000);
        b.handle_request(0, req("a", "d1"), ok("d1"), 60_000)
            .unwrap();
        assert!(matches!(
            b.handle_request(1, req("a", "d1"), ok("d1"), 60_000),
            Err(Refusal::Duplicate(r)) if r.status == RpcStatus::Queued
        ));
        let r = b
            .handle_request(
                2,
                req("bad", "d1"),
                Err("unknown method \"x\"".into()),
                60_000,
            )
            .unwrap();
        assert_eq!(r.status, RpcStatus::Failed);
        b.handle_timeout(20_000);
        assert_eq!(b.get("a").unwrap().status, RpcStatus::Expired);
        let st = statuses(&mut b);
        assert_eq!(
            st.iter().filter(|(id, _)| id == "a").count(),
            2,
            "queued then expired"
        );
        // A late presence sends nothing for the expired one.
        b.handle_event(30_000, presence("d1", 0, 1, true, true));
        assert!(b.poll_exec().is_none());
        // Retention: finished records go after 60 s, or past the cap.
        b.handle_timeout(90_000);
        assert!(b.get("a").is_none());
        b.set_max_finished(2);
        for i in 0..5 {
            let id = format!("x{i}");
            b.handle_request(100_000, req(&id, "d9"), Err("no".into()), 60_000)
                .unwrap();
        }
        b.handle_timeout(100_001);
        assert!(b.get("x2").is_none() && b.get("x3").is_some() && b.get("x4").is_some());
    }

    #[test]
    fn returned_rpcs_go_back_to_the_head_and_newer_presence_wins() {
        let mut b = RpcBook::new(60_000);
        b.handle_event(0, presence("d1", 0, 5, true, true));
        b.handle_request(0, req("a", "d1"), ok("d1"), 60_000)
            .unwrap();
        b.handle_request(0, req("b", "d1"), ok("d1"), 60_000)
            .unwrap();
        assert_eq!(b.poll_exec().unwrap().0, 0);
        b.handle_event(
            1,
            RpcEvent::Returned {
                rpc_id: Arc::from("a"),
            },
        );
        // The device moved to shard 1 (a newer report); an older report
        // from shard 0 arriving late is ignored.
        b.handle_event(2, presence("d1", 1, 6, true, true));
        b.handle_event(3, presence("d1", 0, 5, false, false));
        let (shard, e) = b.poll_exec().unwrap();
        assert_eq!((shard, &*e.rpc_id), (1, "a"));
    }

    /// The race seen in CI after a restart: the book dispatches on the
    /// restored registration's report from shard 1 while the device's
    /// Update from a new port moves it to shard 0; shard 0's newer report
    /// arrives while the RPC is in flight, then shard 1 hands it back. The
    /// newer report still stands, so the RPC goes to shard 0 at once (it
    /// used to wait for a report that never came).
    #[test]
    fn returned_after_a_newer_report_goes_to_the_new_shard_at_once() {
        let mut b = RpcBook::new(60_000);
        b.handle_request(0, req("a", "d1"), ok("d1"), 60_000)
            .unwrap();
        b.handle_event(1, presence("d1", 1, 5, true, true));
        assert_eq!(b.poll_exec().unwrap().0, 1);
        b.handle_event(2, presence("d1", 0, 6, true, true));
        assert!(b.poll_exec().is_none(), "one in flight");
        b.handle_event(
            3,
            RpcEvent::Returned {
                rpc_id: Arc::from("a"),
            },
        );
        let (shard, e) = b.poll_exec().expect("re-sent to the newer shard");
        assert_eq!((shard, &*e.rpc_id), (0, "a"));
        assert_eq!(b.get("a").unwrap().status, RpcStatus::Sent);
        assert_eq!(
            statuses(&mut b),
            vec![
                ("a".into(), RpcStatus::Queued),
                ("a".into(), RpcStatus::Sent)
            ],
            "`sent` announced once"
        );
        // Handed back again with no newer report: it waits.
        b.handle_event(
            4,
            RpcEvent::Returned {
                rpc_id: Arc::from("a"),
            },
        );
        assert!(b.poll_exec().is_none());
        assert_eq!(b.get("a").unwrap().status, RpcStatus::Queued);
    }

    #[test]
    fn replay_resumes_queued_and_ends_sent_ones() {
        let mut b = RpcBook::new(60_000);
        b.handle_request(0, req("q", "d1"), ok("d1"), 60_000)
            .unwrap();
        b.handle_request(0, req("s", "d2"), ok("d2"), 60_000)
            .unwrap();
        b.handle_request(0, req("f", "d3"), ok("d3"), 60_000)
            .unwrap();
        b.handle_event(1, presence("d2", 0, 1, true, true));
        b.handle_event(1, presence("d3", 0, 1, true, true));
        b.handle_event(2, done("f", RpcStatus::Succeeded));
        let log: Vec<LogRecord> = std::iter::from_fn(|| b.poll_log()).collect();
        for compacted in [false, true] {
            let records = if compacted {
                b.compacted()
            } else {
                log.clone()
            };
            let mut b2 = RpcBook::new(60_000);
            let (resumed, interrupted) = b2.replay(3, records, &|r| ok(&r.device_id));
            assert_eq!((resumed, interrupted), (1, 1));
            assert_eq!(b2.get("q").unwrap().status, RpcStatus::Queued);
            assert_eq!(b2.get("s").unwrap().status, RpcStatus::Failed);
            assert_eq!(b2.get("f").unwrap().status, RpcStatus::Succeeded);
            // Only the interrupted one gets a (single) new terminal status.
            assert_eq!(statuses(&mut b2), vec![("s".into(), RpcStatus::Failed)]);
            assert!(matches!(
                b2.handle_request(4, req("f", "d3"), ok("d3"), 60_000),
                Err(Refusal::Duplicate(_))
            ));
            b2.handle_event(5, presence("d1", 0, 1, true, true));
            assert_eq!(&*b2.poll_exec().unwrap().1.rpc_id, "q");
        }
    }

    fn fw_plan() -> Resolved {
        use crate::proto::lwm2m::firmware::*;
        let bytes: Arc<[u8]> = Arc::from(vec![1u8; 4096]);
        Ok((
            "ep-d1".into(),
            Work::Firmware(Box::new(FirmwarePlan {
                params: FirmwareParams::parse(&serde_json::json!({"image": "fw"})).unwrap(),
                image: Some(ImageRef {
                    name: Arc::from("fw"),
                    version: "2".into(),
                    sha256: String::new(),
                    image: FwImage::new(bytes, &[9u8; 32]),
                }),
            })),
        ))
    }

    fn answer(id: &str, code: &str, response: Option<serde_json::Value>) -> RpcEvent {
        RpcEvent::Done {
            rpc_id: Arc::from(id),
            outcome: RpcOutcome {
                status: if code.starts_with('2') {
                    RpcStatus::Succeeded
                } else {
                    RpcStatus::Failed
                },
                code: Some(code.into()),
                response,
                reason: None,
            },
        }
    }

    fn reg(dev: &str, order: u64, registration: &str) -> RpcEvent {
        let RpcEvent::Presence(mut p) = presence(dev, 0, order, true, true) else {
            unreachable!()
        };
        p.registration_id = registration.into();
        RpcEvent::Presence(p)
    }

    /// A firmware update holds the device's queue slot through its steps,
    /// each sent only when the shard reports the device ready; the image is
    /// served while it runs; progress statuses are published in order; the
    /// deadline ends it wherever it is.
    #[test]
    fn firmware_update_steps_through_the_shard() {
        use crate::proto::lwm2m::firmware::UriBases;
        use serde_json::json;
        let mut b = RpcBook::new(60_000);
        b.set_firmware(
            UriBases {
                coap: Some("coap://127.0.0.1:5683".into()),
                coaps: None,
            },
            60_000,
        );
        let mut r = req("fw1", "d1");
        r.method = "firmware_update".into();
        b.handle_request(0, r, fw_plan(), 60_000).unwrap();
        let mut after = req("after", "d1");
        after.timeout_ms = Some(600_000);
        b.handle_request(1, after, ok("d1"), 60_000).unwrap();
        b.handle_event(2, reg("d1", 1, "r1"));
        let (name, img) = b.poll_serve().expect("image served");
        assert_eq!(&*name, "fw");
        assert!(img.is_some());
        let mut order = 1;
        let mut step = |b: &mut RpcBook, ev: Option<RpcEvent>| -> Option<Op> {
            if let Some(ev) = ev {
                b.handle_event(3, ev);
            }
            let e = b.poll_exec();
            // The shard is ready again after each operation.
            order += 1;
            b.handle_event(3, reg("d1", order, "r1"));
            e.map(|(_, e)| {
                assert!(e.job);
                assert_eq!(&*e.rpc_id, "fw1");
                e.op
            })
        };
        assert!(matches!(step(&mut b, None), Some(Op::Observe { .. })));
        assert!(matches!(
            step(
                &mut b,
                Some(answer("fw1", "2.05", Some(json!({"/5/0/3": 0}))))
            ),
            Some(Op::Observe { .. })
        ));
        assert!(matches!(
            step(
                &mut b,
                Some(answer("fw1", "2.05", Some(json!({"/5/0/5": 0}))))
            ),
            Some(Op::Write { .. })
        ));
        assert!(step(&mut b, Some(answer("fw1", "2.04", None))).is_none());
        // The device downloads from a shard: progress by device and image.
        b.handle_event(
            4,
            RpcEvent::Progress {
                device_id: "d1".into(),
                rpc_id: None,
                image: Some(Arc::from("fw")),
                bytes: 2048,
            },
        );
        // Another image's progress is not this job's.
        b.handle_event(
            4,
            RpcEvent::Progress {
                device_id: "d1".into(),
                rpc_id: None,
                image: Some(Arc::from("other")),
                bytes: 4096,
            },
        );
        let st: Vec<RpcRecord> = std::iter::from_fn(|| b.poll_status()).collect();
        let tail: Vec<_> = st
            .iter()
            .filter(|r| &*r.rpc_id == "fw1")
            .map(|r| (r.status, r.progress.as_ref().map(|p| p["bytes"].clone())))
            .collect();
        assert_eq!(
            tail,
            vec![
                (RpcStatus::Queued, None),
                (RpcStatus::Sent, None),
                (RpcStatus::Downloading, Some(json!(0))),
                (RpcStatus::Downloading, Some(json!(2048))),
            ]
        );
        // The next RPC of the device waits for the update.
        assert_eq!(b.get("after").unwrap().status, RpcStatus::Queued);
        b.handle_event(
            5,
            RpcEvent::Notified {
                rpc_id: Arc::from("fw1"),
                values: json!({"/5/0/3": 2}),
            },
        );
        let e = b.poll_exec().unwrap().1;
        assert!(matches!(e.op, Op::Execute { .. }));
        assert_eq!(
            statuses(&mut b),
            vec![("fw1".into(), RpcStatus::Downloaded)]
        );
        // The shard answers; the update is executing; the deadline passes.
        b.handle_event(6, answer("fw1", "2.04", None));
        assert_eq!(statuses(&mut b), vec![("fw1".into(), RpcStatus::Updating)]);
        assert!(b.poll_timeout().unwrap() <= 60_000);
        b.handle_timeout(60_001);
        let r = b.get("fw1").unwrap();
        assert_eq!(r.status, RpcStatus::TimedOut);
        assert!(r.reason.as_deref().unwrap().contains("updating"), "{r:?}");
        assert_eq!(b.jobs(), 0);
        assert_eq!(
            b.poll_serve().map(|(n, i)| (n, i.is_none())),
            Some((Arc::from("fw"), true))
        );
        // The device's next RPC goes out once the shard reports it ready.
        b.handle_event(7, reg("d1", 100, "r1"));
        let (_, e) = b.poll_exec().unwrap();
        assert_eq!(&*e.rpc_id, "after");
        assert!(!e.job);
        // The log shows the update as sent, then finished.
        let log: Vec<LogRecord> = std::iter::from_fn(|| b.poll_log()).collect();
        assert!(log.iter().any(|l| matches!(l, LogRecord::Finished { rpc_id, status: RpcStatus::TimedOut, .. } if rpc_id == "fw1")));
    }
}
