//! The Registration interface (LwM2M TS 1.1 Transport §6.2): Register,
//! Update (which also moves a registration to a new address), De-register,
//! the end of a registration for any reason, and its status events.

use super::*;

impl Server {
    /// LwM2M TS 1.1 Transport §6.2.1 Register: `POST /rd?ep=..` → 2.01
    /// Created with Location-Path `rd/{id}`.
    pub(super) fn register(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
        protected: bool,
    ) {
        let req = match registration::parse_register_request(msg) {
            Ok(r) => r,
            Err(e) => {
                ShardMetrics::inc(&self.metrics.register_rejected_bad_request);
                tracing::debug!(%peer, error = %e, "register refused");
                return self.reply_error(now, peer, msg, e.code(), e.diagnostic(), protected);
            }
        };
        let endpoint = req.params.endpoint.as_str();
        let Some(entry) = ctx.endpoints.get(endpoint).cloned() else {
            ShardMetrics::inc(&self.metrics.register_rejected_unknown_endpoint);
            if self.refused(now) {
                tracing::info!(shard = self.cfg.shard, %peer, endpoint, "register refused: endpoint not provisioned (4.03)");
            }
            return self.reply_error(
                now,
                peer,
                msg,
                Code::FORBIDDEN,
                "endpoint not provisioned",
                protected,
            );
        };
        if let Err(d) = self
            .authorizer
            .authorize(Uplink::Register { endpoint }, &entry, identity)
        {
            ShardMetrics::inc(&self.metrics.register_rejected_unauthorized);
            if self.refused(now) {
                tracing::info!(shard = self.cfg.shard, %peer, endpoint, reason = %d, "register refused (4.03)");
            }
            return self.reply_error(now, peer, msg, Code::FORBIDDEN, "not authorized", protected);
        }
        if !ctx.sink.has_capacity(1) {
            return self.reply_busy(now, peer, msg, protected);
        }
        let endpoint: Arc<str> = Arc::from(endpoint);
        if let Some(old) = self.regs.by_endpoint(&endpoint) {
            ShardMetrics::inc(&self.metrics.registrations_replaced);
            self.end_registration(now, ctx, old, End::Replaced);
        }
        if let Some(old) = self.regs.by_peer(&peer) {
            // Another endpoint used this address before: it is gone from here.
            self.end_registration(now, ctx, old, End::Replaced);
        }
        let id = loop {
            let id = make_id(self.cfg.shard, self.rng.gen());
            if !self.regs.contains(id) && !self.homed.contains_key(&id) {
                break id;
            }
        };
        let lifetime_s = req.params.lifetime_s.max(self.cfg.min_lifetime_s);
        let epoch = self.next_epoch(now);
        let mut reg = Registration {
            id,
            endpoint: endpoint.clone(),
            entry,
            peer,
            lifetime_s,
            binding: req.params.binding.into_boxed_str(),
            version: Version::parse(&req.params.version),
            queue_mode: req.params.queue_mode,
            root_path: req.links.root_path.into_boxed_str(),
            objects: req
                .links
                .objects
                .iter()
                .map(|o| (o.object, o.instance))
                .collect(),
            registered_at_ms: now.wall_ms,
            last_seen_ms: now.wall_ms,
            expires_at: self.expiry_for(now, lifetime_s),
            epoch,
            moves: 0,
            status_seq: 0,
            observations: SmallVec::new(),
            preferred_cf: req.links.content_formats.first().copied(),
            awake_until: req
                .params
                .queue_mode
                .then(|| now.instant + self.cfg.queue_awake),
        };
        match publish_status(ctx.sink, &mut reg, "online", "registered", now.wall_ms) {
            Ok(()) => ShardMetrics::inc(&self.metrics.status_published),
            Err(SinkError::Full) => return self.reply_busy(now, peer, msg, protected),
            Err(SinkError::Rejected) => {
                return self.reply_error(
                    now,
                    peer,
                    msg,
                    Code::INTERNAL_SERVER_ERROR,
                    "status publish failed",
                    protected,
                )
            }
        }
        ShardMetrics::inc(&self.metrics.registrations);
        tracing::info!(
            shard = self.cfg.shard,
            endpoint = %endpoint,
            device_id = %reg.entry.device_id,
            location = %loc_string(id),
            %peer,
            lifetime_s,
            "registered"
        );
        self.regs.insert(reg);
        self.dirty = true;
        self.update_gauges();
        self.session_lifetime(peer, lifetime_s);
        if let Some(r) = self.regs.get(id) {
            if let Some(t) = r.awake_until {
                self.awake_timers.push(Reverse((t, id)));
            }
        }
        self.report_presence(now, id, true, None);
        let loc = registration::location(id);
        let b = MessageBuilder::new(MsgType::Ack, Code::CREATED)
            .token(msg.token)
            .location_segment(b"rd")
            .location_segment(&loc);
        self.ex.respond(now.instant, peer, msg, b, true, true);
        if self.cfg.shards > 1 {
            self.shard_out
                .push_back((Dest::Others, ShardMsg::Takeover { endpoint, epoch }));
        }
        self.setups.insert(id, (now.instant, 0));
        self.plan_observations(now, ctx, id);
        if self.setups.get(&id).is_some_and(|s| s.1 == 0) {
            // Nothing to observe: set up with the 2.01.
            self.setup_answered(now, id);
        }
    }

    /// One of the Observe requests of a registration being set up was
    /// answered (or failed): the last one ends its set-up time.
    pub(super) fn setup_answered(&mut self, now: Now, id: RegId) {
        let Some(s) = self.setups.get_mut(&id) else {
            return;
        };
        s.1 = s.1.saturating_sub(1);
        if s.1 == 0 {
            let since = s.0;
            self.setups.remove(&id);
            self.metrics
                .registration_setup_seconds
                .observe(now.instant.saturating_duration_since(since));
        }
    }

    pub(super) fn expiry_for(&self, now: Now, lifetime_s: u32) -> Instant {
        now.instant + Duration::from_secs(lifetime_s as u64 + self.cfg.lifetime_grace_s)
    }

    /// LwM2M TS 1.1 Transport §6.2.2 Update: `POST /rd/{id}?lt=..&b=..`. An
    /// Update from a new address moves the registration there (TS 1.1
    /// Transport §6.5: a client whose address may have changed starts with
    /// an Update).
    pub(super) fn update(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
        id: RegId,
    ) {
        let protected = true;
        let req = match registration::parse_update_request(msg) {
            Ok(r) => r,
            Err(e) => {
                ShardMetrics::inc(&self.metrics.register_rejected_bad_request);
                return self.reply_error(now, peer, msg, e.code(), e.diagnostic(), protected);
            }
        };
        let Some(endpoint) = self.regs.get(id).map(|r| r.endpoint.clone()) else {
            return self.reply_error(
                now,
                peer,
                msg,
                Code::NOT_FOUND,
                "unknown registration",
                protected,
            );
        };
        let Some(entry) = ctx.endpoints.get(&*endpoint).cloned() else {
            // De-provisioned while the control message is still on its way.
            self.deprovision(now, ctx, id);
            return self.reply_error(
                now,
                peer,
                msg,
                Code::FORBIDDEN,
                "endpoint no longer provisioned",
                protected,
            );
        };
        if let Err(d) = self.authorizer.authorize(
            Uplink::Update {
                endpoint: &endpoint,
            },
            &entry,
            identity,
        ) {
            ShardMetrics::inc(&self.metrics.register_rejected_unauthorized);
            if self.refused(now) {
                tracing::info!(shard = self.cfg.shard, %peer, endpoint = %endpoint, reason = %d, "update refused (4.03)");
            }
            return self.reply_error(now, peer, msg, Code::FORBIDDEN, "not authorized", false);
        }
        if !self.same_security(id, peer) {
            ShardMetrics::inc(&self.metrics.register_rejected_unauthorized);
            if self.refused(now) {
                tracing::info!(shard = self.cfg.shard, %peer, endpoint = %endpoint, "update refused: registered over DTLS, sent without (4.03)");
            }
            return self.reply_error(now, peer, msg, Code::FORBIDDEN, "not authorized", false);
        }
        if !ctx.sink.has_capacity(1) {
            return self.reply_busy(now, peer, msg, protected);
        }
        let min_lt = self.cfg.min_lifetime_s;
        let grace = self.cfg.lifetime_grace_s;
        let old_peer = {
            let Some(reg) = self.regs.get_mut(id) else {
                return;
            };
            if let Some(lt) = req.params.lifetime_s {
                reg.lifetime_s = lt.max(min_lt);
            }
            if let Some(b) = req.params.binding {
                reg.queue_mode = b.contains('Q');
                reg.binding = b.into_boxed_str();
            }
            if let Some(l) = req.links {
                reg.root_path = l.root_path.into_boxed_str();
                reg.objects = l.objects.iter().map(|o| (o.object, o.instance)).collect();
            }
            reg.entry = entry;
            reg.last_seen_ms = now.wall_ms;
            reg.peer
        };
        if old_peer != peer {
            if let Some(other) = self.regs.by_peer(&peer).filter(|o| *o != id) {
                // The address belonged to another registration: that device
                // is gone from it.
                self.end_registration(now, ctx, other, End::Replaced);
            }
            tracing::info!(shard = self.cfg.shard, endpoint = %endpoint, old = %old_peer, new = %peer, "device address changed");
            ShardMetrics::inc(&self.metrics.address_changes);
            self.regs.rebind(id, peer);
            if old_peer.is_dtls() {
                // A new session (new address) took over the registration.
                self.session_cmds.push(SessionCmd::Retire(old_peer));
            }
            self.ex.rebind_peer(old_peer, peer);
        }
        let lifetime_s = self.regs.get(id).map(|r| r.lifetime_s).unwrap_or(0);
        self.session_lifetime(peer, lifetime_s);
        self.regs.set_expiry(
            id,
            now.instant + Duration::from_secs(lifetime_s as u64 + grace),
        );
        if let Some(reg) = self.regs.get_mut(id) {
            if publish_status(ctx.sink, reg, "online", "updated", now.wall_ms).is_ok() {
                ShardMetrics::inc(&self.metrics.status_published);
            }
        }
        ShardMetrics::inc(&self.metrics.updates);
        self.dirty = true;
        self.mark_awake(now, id);
        self.report_presence(now, id, true, None);
        let b = MessageBuilder::new(MsgType::Ack, Code::CHANGED).token(msg.token);
        self.ex.respond(now.instant, peer, msg, b, true, true);
        // New objects, a changed profile, an observation that failed or was
        // lost on the way from another shard: catch up now.
        self.plan_observations(now, ctx, id);
    }

    /// LwM2M TS 1.1 Transport §6.2.3 De-register: `DELETE /rd/{id}` → 2.02.
    pub(super) fn deregister(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
        id: RegId,
    ) {
        let Some(reg) = self.regs.get(id) else {
            return self.reply_error(
                now,
                peer,
                msg,
                Code::NOT_FOUND,
                "unknown registration",
                false,
            );
        };
        if self
            .authorizer
            .authorize(
                Uplink::Deregister {
                    endpoint: &reg.endpoint,
                },
                &reg.entry,
                identity,
            )
            .is_err()
            || !self.same_security(id, peer)
        {
            ShardMetrics::inc(&self.metrics.register_rejected_unauthorized);
            return self.reply_error(now, peer, msg, Code::FORBIDDEN, "not authorized", false);
        }
        if !ctx.sink.has_capacity(1) {
            return self.reply_busy(now, peer, msg, true);
        }
        self.end_registration(now, ctx, id, End::Deregistered);
        ShardMetrics::inc(&self.metrics.deregistrations);
        let b = MessageBuilder::new(MsgType::Ack, Code::DELETED).token(msg.token);
        self.ex.respond(now.instant, peer, msg, b, true, true);
    }

    /// Ends a registration here: its observations and requests go, a status
    /// event says why (except for replacements and moves), the home shard
    /// forgets its pointer.
    pub(super) fn end_registration(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        id: RegId,
        why: End,
    ) -> Option<Registration> {
        let mut reg = self.regs.remove(id)?;
        self.setups.remove(&id);
        for t in &reg.observations {
            self.obs.remove(t);
            self.composite.remove(t);
        }
        self.rpc_registration_ended(now, &reg, why);
        if !self.blocks_in.is_empty() {
            self.blocks_in.forget_peer(&reg.peer);
        }
        for (tok, _) in self.ex.pending_for(&reg.peer) {
            self.requests.remove(&tok);
        }
        self.ex.forget_peer(now.instant, &reg.peer);
        self.dirty = true;
        if reg.peer.is_dtls() && matches!(why, End::Deprovisioned | End::CredentialsChanged) {
            // The session authenticated with credentials that no longer
            // hold: the DTLS layer ends it too.
            self.session_cmds.push(SessionCmd::Revoke(reg.peer));
        }
        if reg.peer.is_dtls() && why == End::Moved {
            // The device's datagrams reach another shard now (a new
            // address): its session here is dead.
            self.session_cmds.push(SessionCmd::Retire(reg.peer));
        }
        let (status, reason) = match why {
            End::Deregistered => ("offline", "deregistered"),
            End::Expired => ("offline", "expired"),
            End::Deprovisioned => ("offline", "deprovisioned"),
            End::CredentialsChanged => ("offline", "credentials_changed"),
            End::Replaced | End::Moved => ("", ""),
        };
        if !status.is_empty() {
            match publish_status(ctx.sink, &mut reg, status, reason, now.wall_ms) {
                Ok(()) => ShardMetrics::inc(&self.metrics.status_published),
                Err(SinkError::Full) => self.defer_status(now, &reg, status, reason),
                Err(SinkError::Rejected) => {}
            }
            tracing::info!(
                shard = self.cfg.shard,
                endpoint = %reg.endpoint,
                device_id = %reg.entry.device_id,
                location = %loc_string(id),
                reason,
                "registration ended"
            );
        }
        if why != End::Moved && self.home_of(id) != self.cfg.shard {
            self.send_to_shard(
                self.home_of(id),
                ShardMsg::Unhomed {
                    id,
                    moves: reg.moves,
                },
            );
        }
        if why != End::Moved && self.home_of(id) == self.cfg.shard {
            self.homed.remove(&id);
        }
        self.update_gauges();
        Some(reg)
    }

    /// A registration made over DTLS takes Update and De-register only over
    /// DTLS (Leshan's security check: the identity that registered; the
    /// authorizer has matched the identity to the entry already).
    fn same_security(&self, id: RegId, peer: PeerId) -> bool {
        self.regs
            .get(id)
            .is_none_or(|r| !r.peer.is_dtls() || peer.is_dtls())
    }

    /// A DTLS session carrying a registration stays while the registration
    /// may: its idle timeout becomes the lifetime plus grace (plus a minute
    /// for the device's clock).
    fn session_lifetime(&mut self, peer: PeerId, lifetime_s: u32) {
        if peer.is_dtls() {
            let s = lifetime_s as u64 + self.cfg.lifetime_grace_s + 60;
            self.session_cmds
                .push(SessionCmd::IdleTimeout(peer, s.min(u32::MAX as u64) as u32));
        }
    }

    pub(super) fn deprovision(&mut self, now: Now, ctx: &mut Ctx<'_>, id: RegId) {
        if let Some(reg) = self.end_registration(now, ctx, id, End::Deprovisioned) {
            ShardMetrics::inc(&self.metrics.deprovisioned);
            let until = now.instant
                + Duration::from_secs(reg.lifetime_s as u64 + self.cfg.lifetime_grace_s);
            self.tombstones.insert(id, until);
        }
    }

    pub(super) fn defer_status(
        &mut self,
        now: Now,
        reg: &Registration,
        status: &'static str,
        reason: &'static str,
    ) {
        self.backlog.push_back(OwnedStatus {
            endpoint: reg.endpoint.clone(),
            entry: reg.entry.clone(),
            status,
            reason,
            last_seen: reg.last_seen_ms,
            registration_id: loc_string(reg.id),
            lifetime_s: reg.lifetime_s,
            binding: reg.binding.to_string(),
            version: reg.version,
            queue_mode: reg.queue_mode,
            address: reg.peer.to_string(),
            objects: reg.object_links(),
            seq: reg.status_seq as u64,
        });
        self.backlog_retry = Some(now.instant + Duration::from_millis(100));
    }
}

/// Publishes a status event for `reg` (and counts it in its sequence).
fn publish_status(
    sink: &mut dyn Sink,
    reg: &mut Registration,
    status: &'static str,
    reason: &'static str,
    now_ms: i64,
) -> Result<(), SinkError> {
    let loc = registration::location(reg.id);
    sink.publish_status(&StatusEvent {
        tenant_id: &reg.entry.tenant_id,
        device_id: &reg.entry.device_id,
        endpoint: &reg.endpoint,
        status,
        reason,
        last_seen: reg.last_seen_ms,
        ts: now_ms,
        registration: RegistrationInfo {
            registration_id: std::str::from_utf8(&loc).unwrap_or(""),
            lifetime_s: reg.lifetime_s,
            binding: &reg.binding,
            lwm2m_version: reg.version.as_str(),
            queue_mode: reg.queue_mode,
            address: reg.peer.to_string(),
            objects: reg.object_links(),
            seq: reg.status_seq as u64,
        },
    })
    .inspect(|()| reg.status_seq += 1)
}
