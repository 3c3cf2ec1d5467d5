//! Device Management on the shard: the one RPC in flight per registration
//! (LwM2M TS 1.1 Core §5.4, Transport §6.3, §6.4), block-wise transfers in
//! both directions (RFC 7959), and the presence reports that let the RPC
//! control plane route to the shard that holds a device.
//!
//! Flow: the control plane sends an [`RpcExec`] only after the device was
//! reported reachable here ([`RpcEvent::Presence`]) and the RPC was recorded
//! as `sent`; the shard sends it at once as a CON request (retransmitted by
//! the exchange layer, RFC 7252 §4.2) or hands it back unsent
//! ([`RpcEvent::Returned`]). Its answer, the exchange layer's timeout, the
//! RPC's own deadline or the end of the registration finishes it
//! ([`RpcEvent::Done`]). One RPC per registration at a time keeps per-device
//! order; the control plane holds the rest.
//!
//! Queue mode (TS 1.1 Transport §6.5): a device registered with `Q` is
//! reachable only for `queue_awake` after it sent something (Register,
//! Update, Send, a notification); it is reported unreachable when that
//! passes, reachable again at its next message.

use super::*;
use crate::proto::coap::block::{self, Block1Upload, Block2Assembly};
use crate::proto::coap::exchange::FailReason;
use crate::proto::coap::Block;
use crate::proto::lwm2m::dm::{self as ops, Op, OpRequest};
use crate::proto::lwm2m::rpc::type_of;

/// An RPC being carried out for one registration.
pub(crate) struct InFlight {
    rpc_id: Arc<str>,
    op: Op,
    req: OpRequest,
    deadline: Instant,
    /// The token of the CoAP request on the wire now.
    token: Token,
    /// The token an observation established by this RPC keeps (the first
    /// request's).
    first_token: Token,
    transfer: Transfer,
    /// A step of a multi-step RPC ([`RpcExec::job`]).
    job: bool,
    /// When the progress of its Block1 write was last reported.
    progress_at: Option<Instant>,
    /// When its first request went to the device.
    sent_at: Instant,
}

impl InFlight {
    pub(crate) fn rpc_id(&self) -> &str {
        &self.rpc_id
    }
}

enum Transfer {
    Single,
    /// A response arriving in Block2 blocks.
    Block2(Block2Assembly),
    /// Our body going out in Block1 blocks.
    Block1(Block1Upload),
}

/// 4.13 restarts of one Block1 write before it fails.
const MAX_BLOCK1_RESTARTS: u32 = 4;

fn code_text(c: Code) -> String {
    format!("{}.{:02}", c.class(), c.detail())
}

impl Server {
    // ------------------------------------------------------------ presence

    /// Reports the registration `id` to the RPC control plane.
    pub(super) fn report_presence(
        &mut self,
        now: Now,
        id: RegId,
        online: bool,
        reason: Option<&'static str>,
    ) {
        let Some(r) = self.regs.get(id) else { return };
        let reachable = online && r.reachable(now.instant) && !self.rpcs.contains_key(&id);
        self.rpc_events.push_back(RpcEvent::Presence(presence_of(
            r,
            self.cfg.shard,
            online,
            reachable,
            reason,
        )));
    }

    /// The registration ended here (`why` says how): an RPC in flight on it
    /// fails, and the control plane hears the device is gone unless another
    /// registration replaces it.
    pub(super) fn rpc_registration_ended(&mut self, now: Now, reg: &Registration, why: End) {
        if let Some(f) = self.rpcs.remove(&reg.id) {
            self.ex.cancel(now.instant, f.token);
            let reason = match why {
                End::Moved => "the device's address moved to another shard before it answered",
                End::Replaced => "the device registered again before it answered",
                End::Deregistered => "the device de-registered before it answered",
                End::Expired => "the registration expired before the device answered",
                End::Deprovisioned => "the endpoint was de-provisioned",
                End::CredentialsChanged => "the endpoint's credentials changed",
            };
            self.rpc_done(f.rpc_id, RpcOutcome::failed(reason));
        }
        let reason = match why {
            End::Deregistered => Some("deregistered"),
            End::Expired => Some("expired"),
            End::Deprovisioned => Some("deprovisioned"),
            End::CredentialsChanged => Some("credentials_changed"),
            // Superseded by a newer report from wherever it lives now.
            End::Replaced | End::Moved => None,
        };
        if let Some(reason) = reason {
            let mut p = presence_of(reg, self.cfg.shard, false, false, Some(reason));
            p.last_seen = reg.last_seen_ms.max(0);
            self.rpc_events.push_back(RpcEvent::Presence(p));
        }
    }

    /// The device sent something: a queue-mode device is awake for
    /// `queue_awake` from now. Returns true when it was asleep (the caller
    /// reports it reachable). One timer per wake window: a later message
    /// only moves `awake_until`, and the timer re-arms itself when it fires
    /// early.
    pub(super) fn mark_awake(&mut self, now: Now, id: RegId) -> bool {
        let awake = self.cfg.queue_awake;
        let Some(r) = self.regs.get_mut(id) else {
            return false;
        };
        if !r.queue_mode {
            return false;
        }
        let was = r.reachable(now.instant);
        let until = now.instant + awake;
        r.awake_until = Some(until);
        if !was {
            self.awake_timers.push(Reverse((until, id)));
        }
        !was
    }

    /// [`Server::mark_awake`], reporting a device that woke up.
    pub(super) fn device_awake(&mut self, now: Now, id: RegId) {
        if self.mark_awake(now, id) {
            self.report_presence(now, id, true, None);
        }
    }

    fn rpc_done(&mut self, rpc_id: Arc<str>, outcome: RpcOutcome) {
        let m = &self.metrics;
        ShardMetrics::inc(match outcome.status {
            RpcStatus::Succeeded => &m.rpc_succeeded,
            RpcStatus::TimedOut => &m.rpc_timed_out,
            _ => &m.rpc_failed,
        });
        ShardMetrics::set(&m.rpc_in_flight, self.rpcs.len() as i64);
        self.rpc_events
            .push_back(RpcEvent::Done { rpc_id, outcome });
    }

    /// Ends the RPC of `id` and reports the device ready for the next one.
    fn finish_rpc(&mut self, now: Now, id: RegId, outcome: RpcOutcome) {
        if let Some(f) = self.rpcs.remove(&id) {
            self.metrics
                .rpc_device_seconds
                .observe(now.instant.saturating_duration_since(f.sent_at));
            self.rpc_done(f.rpc_id, outcome);
            self.report_presence(now, id, true, None);
        }
    }

    // ------------------------------------------------------------ exec

    /// An RPC to send to the device registered as `exec.endpoint` here.
    pub fn handle_rpc_exec(&mut self, now: Now, exec: RpcExec) {
        ShardMetrics::inc(&self.metrics.rpc_exec_received);
        let id = self.regs.by_endpoint(&exec.endpoint);
        let usable = id
            .and_then(|id| self.regs.get(id).map(|r| (id, r)))
            .filter(|(id, r)| r.reachable(now.instant) && !self.rpcs.contains_key(id));
        let Some((id, reg)) = usable else {
            ShardMetrics::inc(&self.metrics.rpc_returned);
            self.rpc_events.push_back(RpcEvent::Returned {
                rpc_id: exec.rpc_id,
            });
            return;
        };
        let (version, ct) = (reg.version, reg.preferred_cf);
        let left_ms = exec.deadline_ms - now.wall_ms;
        if left_ms <= 0 {
            return self.rpc_done(
                exec.rpc_id,
                RpcOutcome {
                    status: RpcStatus::TimedOut,
                    code: None,
                    response: None,
                    reason: Some("its timeout passed before it could be sent".into()),
                },
            );
        }
        // Cancel-observe goes out on the observation's own token (RFC 7641
        // §3.6); without one there is nothing to cancel.
        let cancel_token = match &exec.op {
            Op::CancelObserve { path } => {
                let t = self.observation_token(id, |t, o| {
                    o.path == *path && !self.composite.contains_key(&t)
                });
                if t.is_none() {
                    return self.rpc_done(
                        exec.rpc_id,
                        RpcOutcome::failed(format!("{path} is not observed")),
                    );
                }
                t
            }
            Op::CancelObserveComposite { paths } => {
                let t = self.observation_token(id, |t, _| {
                    self.composite
                        .get(&t)
                        .is_some_and(|ps| same_paths(ps, paths))
                });
                if t.is_none() {
                    return self.rpc_done(
                        exec.rpc_id,
                        RpcOutcome::failed("no composite observation of those paths"),
                    );
                }
                t
            }
            // Observing a path observed already refreshes that observation
            // (same token, RFC 7641 §4.1) instead of adding a second one.
            Op::Observe { path, .. } => self.observation_token(id, |t, o| {
                o.path == *path && !self.composite.contains_key(&t)
            }),
            _ => None,
        };
        let req = match exec.op.request(version, ct) {
            Ok(r) => r,
            Err(e) => return self.rpc_done(exec.rpc_id, RpcOutcome::failed(e.to_string())),
        };
        if let Some(t) = cancel_token {
            if matches!(
                exec.op,
                Op::CancelObserve { .. } | Op::CancelObserveComposite { .. }
            ) {
                // Gone from our table first: a notification racing the
                // cancel gets RST, which cancels too.
                self.obs.remove(&t);
                self.composite.remove(&t);
                if let Some(r) = self.regs.get_mut(id) {
                    r.observations.retain(|x| *x != t);
                }
                self.dirty = true;
            }
        }
        let szx = self.cfg.block_szx.min(block::MAX_SZX);
        let mut req = req;
        let transfer = if let Some(body) = req.shared.take() {
            // A shared package: Block1 straight from it, no copy.
            if Block1Upload::fits(body.len(), szx) {
                req.payload = body.to_vec();
                Transfer::Single
            } else {
                Transfer::Block1(Block1Upload::new(body, szx))
            }
        } else if !Block1Upload::fits(req.payload.len(), szx) {
            // The body lives in the upload from here on.
            Transfer::Block1(Block1Upload::new(
                std::mem::take(&mut req.payload).into(),
                szx,
            ))
        } else {
            Transfer::Single
        };
        let deadline = now.instant + Duration::from_millis(left_ms as u64);
        let mut f = InFlight {
            rpc_id: exec.rpc_id,
            op: exec.op,
            req,
            deadline,
            token: 0,
            first_token: 0,
            transfer,
            job: exec.job,
            progress_at: None,
            sent_at: now.instant,
        };
        let token = self.send_rpc_request(now, id, &f, cancel_token, None, true);
        let Some(token) = token else {
            return self.rpc_done(f.rpc_id, RpcOutcome::failed("registration vanished"));
        };
        f.token = token;
        f.first_token = token;
        self.rpcs.insert(id, f);
        self.rpc_timers.push(Reverse((deadline, id)));
        ShardMetrics::set(&self.metrics.rpc_in_flight, self.rpcs.len() as i64);
        // Busy with this one: not ready for another.
        self.report_presence(now, id, true, None);
    }

    /// The token of the first observation of `id` that `pred` accepts.
    fn observation_token(
        &self,
        id: RegId,
        pred: impl Fn(Token, &Observation) -> bool,
    ) -> Option<Token> {
        let r = self.regs.get(id)?;
        r.observations
            .iter()
            .copied()
            .find(|t| self.obs.get(t).is_some_and(|o| pred(*t, o)))
    }

    /// Sends the (next) CoAP request of `f`: the first one (`first`: with
    /// Observe when the operation observes), a Block1 block, or a Block2
    /// continuation (`block2`).
    fn send_rpc_request(
        &mut self,
        now: Now,
        id: RegId,
        f: &InFlight,
        token: Option<Token>,
        block2: Option<Block>,
        first: bool,
    ) -> Option<Token> {
        let reg = self.regs.get(id)?;
        let peer = reg.peer;
        let root = reg.root_path.clone();
        let token = token.unwrap_or_else(|| {
            let obs = &self.obs;
            self.ex.alloc_token(|t| obs.contains_key(&t))
        });
        let tb = token.to_be_bytes();
        let r = &f.req;
        let mut b = MessageBuilder::request(r.code, true).token(&tb);
        for seg in root_segments(&root) {
            b = b.path_segment(seg.as_bytes());
        }
        for i in &r.path {
            b = b.path_id(*i);
        }
        for q in &r.queries {
            b = b.query(q);
        }
        if let (true, Some(o)) = (first && block2.is_none(), r.observe) {
            b = b.observe(o);
        }
        if let Some(cf) = r.content_format {
            b = b.content_format(cf);
        }
        if let Some(a) = r.accept {
            b = b.accept(a);
        }
        match &f.transfer {
            Transfer::Block1(u) => {
                let (blk, bytes) = u.current();
                ShardMetrics::inc(&self.metrics.block1_sent);
                b = b.block1(blk).payload(bytes);
                if blk.num == 0 {
                    // RFC 7959 §4: Size1 tells the device the whole size.
                    b = b.size1(u.total() as u32);
                }
            }
            _ => {
                if block2.is_none() {
                    b = b.payload(&r.payload);
                } else if r.code == Code::FETCH {
                    // A FETCH continuation repeats its body (RFC 8132 §2).
                    b = b.payload(&r.payload);
                }
            }
        }
        if let Some(blk) = block2 {
            ShardMetrics::inc(&self.metrics.block2_continuations);
            b = b.block2(blk);
        }
        self.ex.request(now.instant, peer, token, b, token);
        self.requests.insert(
            token,
            Purpose {
                reg: id,
                path: f.op.path().unwrap_or(ResourcePath {
                    object: 0,
                    instance: None,
                    resource: None,
                    resource_instance: None,
                }),
                kind: Kind::Rpc,
                sent_at: now.instant,
            },
        );
        Some(token)
    }

    /// A response to a request of the RPC of registration `id`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_rpc_response(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        msg: &Message<'_>,
        id: RegId,
        token: Token,
        separate: bool,
    ) {
        if separate {
            self.ex
                .ack(now.instant, peer, msg.mtype, msg.message_id, true);
        }
        self.device_awake(now, id);
        let Some(mut f) = self.rpcs.remove(&id) else {
            return;
        };
        if f.token != token {
            // A late answer to an earlier block of this RPC.
            self.rpcs.insert(id, f);
            return;
        }
        // Block1 upload: continue, shrink, or finish (RFC 7959 §2.3, §2.9.3).
        if let Transfer::Block1(u) = &mut f.transfer {
            if msg.code == Code::CONTINUE {
                match u.on_continue(msg.block1()) {
                    Ok(false) => {
                        if f.job {
                            let done = u.offset() as u64;
                            self.job_progress(now, id, &mut f, done);
                        }
                        return self.next_block(now, id, f);
                    }
                    Ok(true) => {}
                    Err(e) => {
                        return self.rpc_finished(
                            now,
                            id,
                            f,
                            RpcOutcome::failed(format!("block-wise write: {e}")),
                        );
                    }
                }
            } else if msg.code == Code::REQUEST_ENTITY_TOO_LARGE
                && u.restarts < MAX_BLOCK1_RESTARTS
                && u.on_too_large(msg.block1(), msg.size1()).is_ok()
            {
                return self.next_block(now, id, f);
            }
        }
        // Block2 response: collect and ask for the next block (§2.4, §2.7).
        let mut body: Option<Vec<u8>> = None;
        if msg.code.is_success() {
            if let Some(b2) = msg.block2() {
                if !matches!(f.transfer, Transfer::Block2(_)) {
                    f.transfer = Transfer::Block2(Block2Assembly::new(self.cfg.max_body));
                }
                let Transfer::Block2(asm) = &mut f.transfer else {
                    return;
                };
                let etag = msg.option(crate::proto::coap::opt::ETAG).map(|o| o.value);
                match asm.feed(b2, etag, msg.payload) {
                    Ok(Some(next)) => {
                        if f.op.observes() && token == f.first_token {
                            self.establish_rpc_observation(now, id, &f, msg);
                        }
                        let szx = next.szx.min(self.cfg.block_szx.min(block::MAX_SZX));
                        // A smaller size of ours starts at the same offset.
                        let next = if szx < next.szx {
                            Block {
                                num: next.num << (next.szx - szx),
                                more: false,
                                szx,
                            }
                        } else {
                            next
                        };
                        let tok = self.send_rpc_request(now, id, &f, None, Some(next), false);
                        if let Some(t) = tok {
                            f.token = t;
                            self.rpcs.insert(id, f);
                        }
                        return;
                    }
                    Ok(None) => {
                        if let Transfer::Block2(a) =
                            std::mem::replace(&mut f.transfer, Transfer::Single)
                        {
                            body = Some(a.into_body());
                        }
                    }
                    Err(e) => {
                        return self.rpc_finished(
                            now,
                            id,
                            f,
                            RpcOutcome::failed(format!("block-wise response: {e}")),
                        );
                    }
                }
            }
        }
        let payload: &[u8] = body.as_deref().unwrap_or(msg.payload);
        if f.op.observes() && msg.code.is_success() && token == f.first_token {
            self.establish_rpc_observation(now, id, &f, msg);
        }
        // An observe response carries the current value: published like
        // any notification (the profile's mappings apply).
        if f.op.observes() && msg.code.is_success() && msg.observe().is_some() && body.is_none() {
            if let Some(path) = f.op.path() {
                if let Published::Busy =
                    self.publish(now, ctx, id, path, msg, Operation::Notify, None)
                {
                    // A piggybacked response cannot be withheld; the next
                    // notification carries a fresh value.
                    ShardMetrics::inc(&self.metrics.notifications_dropped_busy);
                }
            }
        }
        let profile = self
            .regs
            .get(id)
            .and_then(|r| Profile::lookup(ctx.profiles, &r.entry.profile))
            .cloned();
        let types = |p: &ResourcePath| type_of(profile.as_deref(), p);
        let location: SmallVec<[&[u8]; 4]> = msg.location_path().collect();
        let cf = msg.content_format();
        let outcome =
            match ops::interpret(&f.op, msg.code, cf, payload, &location, now.wall_ms, &types) {
                Ok(response) => RpcOutcome {
                    status: if msg.code.is_success() {
                        RpcStatus::Succeeded
                    } else {
                        RpcStatus::Failed
                    },
                    code: Some(code_text(msg.code)),
                    response,
                    reason: (!msg.code.is_success())
                        .then(|| format!("the device answered {}", code_text(msg.code))),
                },
                Err(e) => RpcOutcome {
                    status: RpcStatus::Failed,
                    code: Some(code_text(msg.code)),
                    response: None,
                    reason: Some(format!("undecodable response: {e}")),
                },
            };
        self.rpc_finished(now, id, f, outcome);
    }

    /// Reports the bytes of a job's Block1 write acknowledged so far: at
    /// most every 500 ms per registration.
    fn job_progress(&mut self, now: Now, id: RegId, f: &mut InFlight, bytes: u64) {
        if f.progress_at
            .is_some_and(|t| now.instant < t + Duration::from_millis(500))
        {
            return;
        }
        let Some(r) = self.regs.get(id) else { return };
        f.progress_at = Some(now.instant);
        self.rpc_events.push_back(RpcEvent::Progress {
            device_id: r.entry.device_id.clone(),
            rpc_id: Some(f.rpc_id.clone()),
            image: None,
            bytes,
        });
    }

    fn next_block(&mut self, now: Now, id: RegId, mut f: InFlight) {
        match self.send_rpc_request(now, id, &f, None, None, false) {
            Some(t) => {
                f.token = t;
                self.rpcs.insert(id, f);
            }
            None => self.rpc_done(f.rpc_id, RpcOutcome::failed("registration vanished")),
        }
    }

    fn rpc_finished(&mut self, now: Now, id: RegId, f: InFlight, outcome: RpcOutcome) {
        self.rpcs.insert(id, f);
        self.finish_rpc(now, id, outcome);
    }

    /// An Observe / Observe-Composite RPC succeeded: the observation is
    /// kept under the first request's token, marked as the RPC's (RFC 7641
    /// §3.2: an Observe option in the response establishes it).
    fn establish_rpc_observation(&mut self, now: Now, id: RegId, f: &InFlight, msg: &Message<'_>) {
        let Some(seq) = msg.observe() else { return };
        let Some(path) = f.op.path() else { return };
        let tok = f.first_token;
        let owner = f.job.then(|| f.rpc_id.clone());
        if let Some(o) = self.obs.get_mut(&tok) {
            o.rpc = true;
            if owner.is_some() {
                o.owner = owner;
            }
            return;
        }
        let mut window = ObserveWindow::default();
        window.record(now.instant, seq);
        self.obs.insert(
            tok,
            Observation {
                reg: id,
                path,
                window,
                rpc: true,
                owner,
            },
        );
        if let Op::ObserveComposite { paths, .. } = &f.op {
            self.composite.insert(tok, paths.clone().into_boxed_slice());
        }
        if let Some(r) = self.regs.get_mut(id) {
            r.observations.push(tok);
        }
        ShardMetrics::inc(&self.metrics.observe_established);
        self.dirty = true;
    }

    /// A fresh notification of observation `token`: when a multi-step RPC
    /// owns it, its values go to the control plane.
    pub(super) fn forward_notification(
        &mut self,
        now: Now,
        token: Token,
        path: ResourcePath,
        msg: &Message<'_>,
    ) {
        let Some(owner) = self.obs.get(&token).and_then(|o| o.owner.clone()) else {
            return;
        };
        let read = Op::Read { path, format: None };
        let types = |p: &ResourcePath| type_of(None, p);
        if let Ok(Some(values)) = ops::interpret(
            &read,
            msg.code,
            msg.content_format(),
            msg.payload,
            &[],
            now.wall_ms,
            &types,
        ) {
            self.rpc_events.push_back(RpcEvent::Notified {
                rpc_id: owner,
                values,
            });
        }
    }

    /// A request of an RPC failed in the exchange layer (no ACK after the
    /// retransmissions, or RST).
    pub(super) fn on_rpc_failure(&mut self, now: Now, id: RegId, token: Token, reason: FailReason) {
        let Some(f) = self.rpcs.get(&id) else { return };
        if f.token != token {
            return;
        }
        let outcome = match reason {
            FailReason::Timeout => RpcOutcome {
                status: RpcStatus::TimedOut,
                code: None,
                response: None,
                reason: Some("no answer from the device after the CoAP retransmissions".into()),
            },
            FailReason::Reset => RpcOutcome::failed("the device rejected the request (RST)"),
        };
        self.finish_rpc(now, id, outcome);
    }

    // ------------------------------------------------------------ timers

    pub(super) fn next_rpc_timer(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, id))) = self.rpc_timers.peek().copied() {
            if self.rpcs.get(&id).is_some_and(|f| f.deadline == at) {
                break;
            }
            self.rpc_timers.pop();
        }
        while let Some(Reverse((_, id))) = self.awake_timers.peek().copied() {
            if self.regs.get(id).is_some_and(|r| r.awake_until.is_some()) {
                break;
            }
            self.awake_timers.pop();
        }
        let a = self.rpc_timers.peek().map(|r| r.0 .0);
        let b = self.awake_timers.peek().map(|r| r.0 .0);
        let c = self.next_download_timer();
        [a, b, c].into_iter().flatten().min()
    }

    /// RPC deadlines (`timed_out`, the CoAP request is abandoned) and
    /// queue-mode devices falling asleep (reported unreachable).
    pub(super) fn rpc_timeouts(&mut self, now: Now) {
        self.download_timeouts(now);
        while let Some(Reverse((at, id))) = self.rpc_timers.peek().copied() {
            if at > now.instant {
                break;
            }
            self.rpc_timers.pop();
            if self.rpcs.get(&id).is_none_or(|f| f.deadline != at) {
                continue;
            }
            if let Some(tok) = self.rpcs.get(&id).map(|f| f.token) {
                self.ex.cancel(now.instant, tok);
                self.requests.remove(&tok);
            }
            self.finish_rpc(
                now,
                id,
                RpcOutcome {
                    status: RpcStatus::TimedOut,
                    code: None,
                    response: None,
                    reason: Some("no final answer within timeout_ms".into()),
                },
            );
        }
        while let Some(Reverse((at, id))) = self.awake_timers.peek().copied() {
            if at > now.instant {
                break;
            }
            self.awake_timers.pop();
            match self.regs.get(id).and_then(|r| r.awake_until) {
                // Extended since the timer was set: wait for the new end.
                Some(until) if until > now.instant => {
                    self.awake_timers.push(Reverse((until, id)));
                }
                Some(_) => {
                    if let Some(r) = self.regs.get_mut(id) {
                        r.awake_until = None;
                    }
                    self.report_presence(now, id, true, None);
                }
                None => {}
            }
        }
    }
}

fn same_paths(a: &[ResourcePath], b: &[ResourcePath]) -> bool {
    a.len() == b.len() && a.iter().all(|p| b.contains(p))
}

/// A registration as the control plane sees it.
pub(super) fn presence_of(
    r: &Registration,
    shard: u16,
    online: bool,
    reachable: bool,
    reason: Option<&'static str>,
) -> Presence {
    Presence {
        device_id: r.entry.device_id.clone(),
        tenant_id: r.entry.tenant_id.clone(),
        endpoint: r.endpoint.clone(),
        shard,
        order: (r.epoch.counter, r.epoch.shard, r.moves),
        online,
        reachable,
        registration_id: loc_string(r.id),
        address: r.peer.to_string(),
        lwm2m_version: r.version.as_str(),
        binding: r.binding.to_string(),
        lifetime_s: r.lifetime_s,
        queue_mode: r.queue_mode,
        registered_at: r.registered_at_ms,
        last_seen: r.last_seen_ms,
        reason,
    }
}
