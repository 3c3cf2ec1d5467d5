//! Information Reporting (LwM2M TS 1.1 Core §5.5, §6.4): Send, the
//! observations the profile asks for (Write-Attributes, Observe, cancel, one
//! request at a time), their responses and notifications, publishing values as
//! TelemetryPoints, and acknowledgements held until the broker confirmed
//! them.

use super::*;

impl Server {
    /// LwM2M 1.1 Send (`POST /dp`, SenML).
    pub(super) fn send(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
    ) {
        ShardMetrics::inc(&self.metrics.send_rx);
        let Some(id) = self.regs.by_peer(&peer) else {
            return self.reply_error(now, peer, msg, Code::NOT_FOUND, "not registered", false);
        };
        if let Some(reg) = self.regs.get(id) {
            if self
                .authorizer
                .authorize(
                    Uplink::Send {
                        endpoint: &reg.endpoint,
                    },
                    &reg.entry,
                    identity,
                )
                .is_err()
            {
                return self.reply_error(now, peer, msg, Code::FORBIDDEN, "not authorized", true);
            }
        }
        if let Err(e) = send::content_format(msg) {
            return self.reply_error(
                now,
                peer,
                msg,
                e.code(),
                "Send takes SenML JSON or CBOR",
                true,
            );
        }
        if let Some(reg) = self.regs.get_mut(id) {
            reg.last_seen_ms = now.wall_ms;
        }
        self.device_awake(now, id);
        let tag = self.tag_for(msg.mtype);
        match self.publish(now, ctx, id, send::ROOT, msg, Operation::Send, tag) {
            Published::Busy => self.reply_busy(now, peer, msg, true),
            Published::Undecodable => self.reply_error(
                now,
                peer,
                msg,
                Code::BAD_REQUEST,
                "undecodable payload",
                true,
            ),
            Published::Queued(n) if tag.is_some() => {
                self.ex.hold(now.instant, peer, msg.message_id, true);
                self.await_delivery(
                    now.instant,
                    tag,
                    n,
                    peer,
                    msg,
                    HeldReply::Changed {
                        token: SmallVec::from_slice(msg.token),
                    },
                );
            }
            Published::Queued(_) | Published::Nothing => {
                let b = MessageBuilder::new(MsgType::Ack, Code::CHANGED).token(msg.token);
                self.ex.respond(now.instant, peer, msg, b, true, true);
            }
        }
    }

    /// A delivery tag when this message's answer waits for the broker.
    pub(super) fn tag_for(&mut self, mtype: MsgType) -> Option<DeliveryTag> {
        if self.cfg.ack_policy == AckPolicy::Delivered && mtype == MsgType::Con {
            let t = self.next_tag;
            self.next_tag += 1;
            Some(t)
        } else {
            None
        }
    }

    pub(super) fn await_delivery(
        &mut self,
        now: Instant,
        tag: Option<DeliveryTag>,
        n: u32,
        peer: PeerId,
        msg: &Message<'_>,
        reply: HeldReply,
    ) {
        let Some(tag) = tag else { return };
        self.acks.insert(
            tag,
            PendingAck {
                peer,
                mtype: msg.mtype,
                mid: msg.message_id,
                reply,
                remaining: n,
                failed: false,
                since: now,
            },
        );
        ShardMetrics::set(&self.metrics.acks_awaiting_delivery, self.acks.len() as i64);
    }

    /// The broker's verdict on a record tagged `tag`. When every record of a
    /// held message is delivered, the message is acknowledged; when one
    /// failed, it is released unanswered so the device's retransmission is
    /// processed again (RFC 7252 §4.2).
    pub fn handle_delivery(&mut self, now: Now, tag: DeliveryTag, ok: bool) {
        let Some(p) = self.acks.get_mut(&tag) else {
            return;
        };
        p.remaining = p.remaining.saturating_sub(1);
        p.failed |= !ok;
        if p.remaining > 0 {
            return;
        }
        let Some(p) = self.acks.remove(&tag) else {
            return;
        };
        ShardMetrics::set(&self.metrics.acks_awaiting_delivery, self.acks.len() as i64);
        if p.failed {
            ShardMetrics::inc(&self.metrics.acks_withheld_delivery_failed);
            self.ex.release(p.peer, p.mid);
            return;
        }
        self.metrics
            .con_ack_delay_seconds
            .observe(now.instant.saturating_duration_since(p.since));
        let protected = self.regs.by_peer(&p.peer).is_some();
        match p.reply {
            HeldReply::EmptyAck { observed } => {
                if let Some((tok, seq)) = observed {
                    if let Some(o) = self.obs.get_mut(&tok) {
                        o.window.record(now.instant, seq);
                    }
                }
                self.ex.ack(now.instant, p.peer, p.mtype, p.mid, protected)
            }
            HeldReply::Changed { token } => {
                let b = MessageBuilder::new(MsgType::Ack, Code::CHANGED).token(&token);
                self.ex
                    .respond_to(now.instant, p.peer, p.mtype, p.mid, b, true, protected);
            }
        }
    }

    // ------------------------------------------------------------ observe

    /// Brings the observations of `id` in line with its profile and objects:
    /// Write-Attributes (when the profile asks) and Observe for each wanted
    /// path not observed or requested yet (TS 1.1 Core §5.4.4, §5.5.1; RFC
    /// 7641 §3.1), and a cancel (GET with Observe = 1 on the same token, RFC
    /// 7641 §3.6) for each observed path no longer wanted. The exchange layer
    /// sends them one at a time (NSTART).
    pub(super) fn plan_observations(&mut self, now: Now, ctx: &mut Ctx<'_>, id: RegId) {
        let Some(reg) = self.regs.get(id) else { return };
        let Some(profile) = Profile::lookup(ctx.profiles, &reg.entry.profile) else {
            return;
        };
        // Observations set up by RPC are the RPC caller's: the profile
        // neither counts nor cancels them.
        let established: SmallVec<[(ResourcePath, Token); 8]> = reg
            .observations
            .iter()
            .filter_map(|t| self.obs.get(t).filter(|o| !o.rpc).map(|o| (o.path, *t)))
            .collect();
        let requested: SmallVec<[ResourcePath; 8]> = self
            .ex
            .pending_for(&reg.peer)
            .iter()
            .filter_map(|(t, _)| self.requests.get(t))
            .filter(|p| p.reg == id && p.kind == Kind::Observe)
            .map(|p| p.path)
            .collect();
        let wanted: SmallVec<[ObserveSpec; 8]> = profile
            .observe
            .iter()
            .filter(|(p, _, _)| reg.has_object(p.object, p.instance))
            .copied()
            .collect();
        for (path, pmin, pmax) in &wanted {
            if established.iter().any(|(p, _)| p == path) || requested.contains(path) {
                continue;
            }
            if pmin.is_some() || pmax.is_some() {
                let mut q: SmallVec<[String; 2]> = SmallVec::new();
                if let Some(v) = pmin {
                    q.push(format!("pmin={v}"));
                }
                if let Some(v) = pmax {
                    q.push(format!("pmax={v}"));
                }
                self.send_request(
                    now,
                    id,
                    Code::PUT,
                    *path,
                    &q,
                    None,
                    Kind::WriteAttributes,
                    None,
                );
            }
            self.send_request(now, id, Code::GET, *path, &[], Some(0), Kind::Observe, None);
        }
        for (path, tok) in established {
            if wanted.iter().any(|(p, _, _)| *p == path) {
                continue;
            }
            self.obs.remove(&tok);
            if let Some(r) = self.regs.get_mut(id) {
                r.observations.retain(|t| *t != tok);
            }
            ShardMetrics::inc(&self.metrics.observe_cancelled);
            self.dirty = true;
            self.send_request(
                now,
                id,
                Code::GET,
                path,
                &[],
                Some(1),
                Kind::CancelObserve,
                Some(tok),
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_request(
        &mut self,
        now: Now,
        id: RegId,
        code: Code,
        path: ResourcePath,
        queries: &[String],
        observe: Option<u32>,
        kind: Kind,
        token: Option<Token>,
    ) {
        let Some(reg) = self.regs.get(id) else { return };
        let peer = reg.peer;
        let root = reg.root_path.clone();
        let token = token.unwrap_or_else(|| {
            let obs = &self.obs;
            self.ex.alloc_token(|t| obs.contains_key(&t))
        });
        let tb = token.to_be_bytes();
        let mut b = MessageBuilder::request(code, true).token(&tb);
        for seg in root_segments(&root) {
            b = b.path_segment(seg.as_bytes());
        }
        for i in path_ids(&path) {
            b = b.path_id(i);
        }
        for q in queries {
            b = b.query(q);
        }
        if let Some(o) = observe {
            b = b.observe(o);
        }
        self.ex.request(now.instant, peer, token, b, token);
        if kind == Kind::Observe {
            if let Some(s) = self.setups.get_mut(&id) {
                s.1 = s.1.saturating_add(1);
            }
        }
        self.requests.insert(
            token,
            Purpose {
                reg: id,
                path,
                kind,
                sent_at: now.instant,
            },
        );
    }

    pub(super) fn drain_failures(&mut self, now: Now) {
        while let Some(f) = self.ex.poll_failed() {
            if let Some(p) = self.requests.remove(&f.token) {
                if p.kind == Kind::Rpc {
                    self.on_rpc_failure(now, p.reg, f.token, f.reason);
                }
                if p.kind == Kind::Observe {
                    ShardMetrics::inc(&self.metrics.observe_failed);
                    self.setup_answered(now, p.reg);
                    tracing::debug!(peer = %f.peer, path = %p.path, reason = ?f.reason, "observe request failed");
                }
            }
        }
    }

    /// The response to one of our requests.
    pub(super) fn on_response(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        msg: &Message<'_>,
        token: Token,
        separate: bool,
    ) {
        let Some(p) = self.requests.remove(&token) else {
            if separate {
                self.ex
                    .ack(now.instant, peer, msg.mtype, msg.message_id, false);
            }
            return;
        };
        match p.kind {
            Kind::Rpc => self.on_rpc_response(now, ctx, peer, msg, p.reg, token, separate),
            Kind::WriteAttributes | Kind::CancelObserve => {
                if !msg.code.is_success() {
                    tracing::debug!(%peer, code = %msg.code, kind = ?p.kind, "request refused by the device");
                }
                if separate {
                    self.ex
                        .ack(now.instant, peer, msg.mtype, msg.message_id, true);
                }
            }
            Kind::Observe => {
                self.metrics
                    .observe_setup_seconds
                    .observe(now.instant.saturating_duration_since(p.sent_at));
                self.setup_answered(now, p.reg);
                if !msg.code.is_success() || !self.regs.contains(p.reg) {
                    if !msg.code.is_success() {
                        ShardMetrics::inc(&self.metrics.observe_failed);
                    }
                    if separate {
                        self.ex
                            .ack(now.instant, peer, msg.mtype, msg.message_id, true);
                    }
                    return;
                }
                let mut window = ObserveWindow::default();
                if let Some(seq) = msg.observe() {
                    // RFC 7641 §3.2: an Observe option in the response means
                    // the observation is established.
                    window.record(now.instant, seq);
                    ShardMetrics::inc(&self.metrics.observe_established);
                    self.obs.insert(
                        token,
                        Observation {
                            reg: p.reg,
                            path: p.path,
                            window,
                            rpc: false,
                            owner: None,
                        },
                    );
                    if let Some(r) = self.regs.get_mut(p.reg) {
                        r.observations.push(token);
                    }
                    self.dirty = true;
                }
                // The response carries the current value: publish it too.
                let tag = if separate {
                    self.tag_for(msg.mtype)
                } else {
                    None
                };
                match self.publish(now, ctx, p.reg, p.path, msg, Operation::Notify, tag) {
                    Published::Queued(n) if tag.is_some() => {
                        self.ex.hold(now.instant, peer, msg.message_id, true);
                        self.await_delivery(
                            now.instant,
                            tag,
                            n,
                            peer,
                            msg,
                            HeldReply::EmptyAck { observed: None },
                        );
                    }
                    Published::Busy if separate && msg.mtype == MsgType::Con => {
                        ShardMetrics::inc(&self.metrics.notifications_deferred_busy);
                        self.ex.ignore(peer, msg.message_id);
                    }
                    other => {
                        if matches!(other, Published::Busy) {
                            // A piggybacked response cannot be withheld; the
                            // next notification carries a fresh value.
                            ShardMetrics::inc(&self.metrics.notifications_dropped_busy);
                        }
                        if separate {
                            self.ex
                                .ack(now.instant, peer, msg.mtype, msg.message_id, true);
                        }
                    }
                }
            }
        }
    }

    /// An Observe notification (RFC 7641 §4.2), matched by token *and* peer
    /// (RFC 7252 §5.3.2): a token from another peer is not this device's.
    pub(super) fn on_notification(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        msg: &Message<'_>,
    ) {
        // One lookup of the observation: its registration, path and what
        // the Observe number means for it.
        let seq = msg.observe();
        let Some((token, reg_id, path, fresh, owned)) = token_of(msg.token).and_then(|t| {
            self.obs.get(&t).map(|o| {
                let f = seq.map_or(Freshness::Fresh, |s| o.window.check(now.instant, s));
                (t, o.reg, o.path, f, o.owner.is_some())
            })
        }) else {
            // RFC 7641 §3.6: a notification we have no interest in is
            // rejected with RST, which removes the observer on the device.
            ShardMetrics::inc(&self.metrics.notifications_unknown);
            let protected = self.regs.by_peer(&peer).is_some();
            if protected {
                self.ex.reset(now.instant, peer, msg.message_id, true);
            } else {
                self.ex.reset_stateless(peer, msg.message_id);
            }
            return;
        };
        let Some(reg) = self.regs.get_mut(reg_id) else {
            self.obs.remove(&token);
            self.ex.reset_stateless(peer, msg.message_id);
            return;
        };
        if reg.peer != peer {
            let reg_peer = reg.peer;
            ShardMetrics::inc(&self.metrics.notifications_wrong_peer);
            if self.refused(now) {
                tracing::info!(shard = self.cfg.shard, %peer, device = %reg_peer, "notification with a known token from another address rejected (RST)");
            }
            self.ex.reset_stateless(peer, msg.message_id);
            return;
        }
        ShardMetrics::inc(&self.metrics.notifications_rx);
        if msg.unknown_critical_option().is_some() {
            // RFC 7252 §5.4.1: an unrecognised critical option in a CON or
            // NON response rejects it.
            self.ex.reset(now.instant, peer, msg.message_id, true);
            return;
        }
        if !msg.code.is_success() {
            // RFC 7641 §3.2: a non-2.xx notification ends the observation.
            reg.observations.retain(|t| *t != token);
            self.obs.remove(&token);
            self.dirty = true;
            self.ex
                .ack(now.instant, peer, msg.mtype, msg.message_id, true);
            return;
        }
        match fresh {
            Freshness::Duplicate => {
                ShardMetrics::inc(&self.metrics.notifications_duplicate);
                return self
                    .ex
                    .ack(now.instant, peer, msg.mtype, msg.message_id, true);
            }
            Freshness::Stale => {
                ShardMetrics::inc(&self.metrics.notifications_stale);
                return self
                    .ex
                    .ack(now.instant, peer, msg.mtype, msg.message_id, true);
            }
            Freshness::Reordered => ShardMetrics::inc(&self.metrics.notifications_reordered),
            Freshness::Fresh => {}
        }
        reg.last_seen_ms = now.wall_ms;
        if reg.queue_mode {
            self.device_awake(now, reg_id);
        }
        if owned {
            self.forward_notification(now, token, path, msg);
        }
        let tag = self.tag_for(msg.mtype);
        let outcome = self.publish(now, ctx, reg_id, path, msg, Operation::Notify, tag);
        let record = |s: &mut Server| {
            if let (Some(seq), Some(o)) = (seq, s.obs.get_mut(&token)) {
                o.window.record(now.instant, seq);
            }
        };
        match outcome {
            Published::Busy => {
                if msg.mtype == MsgType::Con {
                    // Not acknowledged, not recorded: the device retransmits
                    // and the retry is processed.
                    ShardMetrics::inc(&self.metrics.notifications_deferred_busy);
                    self.ex.ignore(peer, msg.message_id);
                } else {
                    ShardMetrics::inc(&self.metrics.notifications_dropped_busy);
                    record(self);
                    self.ex
                        .ack(now.instant, peer, msg.mtype, msg.message_id, true);
                }
            }
            Published::Queued(n) if tag.is_some() => {
                self.ex.hold(now.instant, peer, msg.message_id, true);
                let observed = seq.map(|s| (token, s));
                self.await_delivery(
                    now.instant,
                    tag,
                    n,
                    peer,
                    msg,
                    HeldReply::EmptyAck { observed },
                );
            }
            Published::Queued(_) | Published::Nothing | Published::Undecodable => {
                // Undecodable: acknowledged, since retrying the same bytes
                // cannot succeed (counted in decode_errors).
                record(self);
                self.ex
                    .ack(now.instant, peer, msg.mtype, msg.message_id, true);
            }
        }
    }

    /// Decodes a payload, maps it through the device profile and publishes
    /// the resulting TelemetryPoints (one per distinct timestamp).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn publish(
        &self,
        now: Now,
        ctx: &mut Ctx<'_>,
        id: RegId,
        base: ResourcePath,
        msg: &Message<'_>,
        op: Operation,
        tag: Option<DeliveryTag>,
    ) -> Published {
        let Some(reg) = self.regs.get(id) else {
            return Published::Nothing;
        };
        let cf = msg.content_format().unwrap_or(if op == Operation::Send {
            content::CF_SENML_CBOR
        } else if base.resource.is_some() {
            content::CF_TEXT
        } else {
            content::CF_TLV
        });
        let values = match content::decode(cf, base, msg.payload, now.wall_ms) {
            Ok(v) => v,
            Err(e) => {
                ShardMetrics::inc(&self.metrics.decode_errors);
                tracing::debug!(endpoint = %reg.endpoint, error = %e, "payload decode failed");
                return Published::Undecodable;
            }
        };
        let Some(profile) = Profile::lookup(ctx.profiles, &reg.entry.profile) else {
            return Published::Nothing;
        };
        let names = unmapped_names(profile, &values);
        let pts = build_points(profile, &names, &values, now.wall_ms);
        ShardMetrics::add(&self.metrics.unmapped_values, pts.unmapped as u64);
        ShardMetrics::add(&self.metrics.decode_errors, pts.bad as u64);
        if pts.points.is_empty() {
            return Published::Nothing;
        }
        if !ctx.sink.has_capacity(pts.points.len()) {
            return Published::Busy;
        }
        let text = base.text();
        let path = match op {
            Operation::Send => "/dp",
            Operation::Notify => text.as_str(),
        };
        let loc = registration::location(id);
        let loc = std::str::from_utf8(&loc).unwrap_or("");
        let mut queued = 0u32;
        for (ts, p) in &pts.points {
            let tp = TelemetryPoint {
                tenant_id: &reg.entry.tenant_id,
                device_id: &reg.entry.device_id,
                endpoint: &reg.endpoint,
                ts: *ts,
                received_at: now.wall_ms,
                numeric_values: &p.numeric,
                string_values: &p.string,
                bool_values: &p.boolean,
                source: PointSource {
                    protocol: "lwm2m",
                    operation: op.as_str(),
                    path,
                    content_format: cf,
                    observe_seq: msg.observe(),
                    shard: self.cfg.shard as usize,
                    registration_id: loc,
                },
            };
            match ctx.sink.publish_telemetry(&tp, tag) {
                Ok(()) => {
                    ShardMetrics::inc(&self.metrics.points_published);
                    queued += 1;
                }
                Err(SinkError::Full) if queued == 0 => return Published::Busy,
                Err(_) => ShardMetrics::inc(&self.metrics.kafka_enqueue_failed),
            }
        }
        if queued == 0 {
            Published::Nothing
        } else {
            Published::Queued(queued)
        }
    }
}
