//! Uplink requests: routing by Uri-Path (`/rd`, `/rd/{id}`, `/dp`), error
//! replies (no diagnostics to unregistered senders), 5.03 back-pressure, and
//! requests for registrations another shard holds (claimed from their home
//! shard).

use super::*;

/// `m` as one message: its options but Block1 and Size1, its payload.
fn without_blocks(m: &Message<'_>) -> Vec<u8> {
    use crate::proto::coap::opt;
    let mut b = MessageBuilder::new(m.mtype, m.code)
        .mid(m.message_id)
        .token(m.token)
        .payload(m.payload);
    for o in m.options() {
        if o.number != opt::BLOCK1 && o.number != opt::SIZE1 {
            b = b.option(o.number, o.value);
        }
    }
    b.to_vec()
}

impl Server {
    // ------------------------------------------------------------ requests

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_request(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
        raw: &[u8],
        route: Route,
    ) {
        let protected = self.regs.by_peer(&peer).is_some();
        if let Some(n) = msg.unknown_critical_option() {
            // RFC 7252 §5.4.1.
            ShardMetrics::inc(&self.metrics.bad_option);
            tracing::debug!(%peer, option = n, "unknown critical option");
            return self.reply_error(
                now,
                peer,
                msg,
                Code::BAD_OPTION,
                "unknown critical option",
                protected,
            );
        }
        // RFC 7959 §2.5: a body in Block1 blocks is collected first; the
        // request runs once, with the whole body.
        let assembled;
        let whole;
        let reencoded;
        let mut raw = raw;
        let msg = match msg.block1() {
            Some(b1) if msg.code.is_request() => {
                ShardMetrics::inc(&self.metrics.block1_rx);
                let key = crate::proto::coap::block::request_key(
                    msg.code.0,
                    msg.uri_path().chain(msg.uri_query()),
                );
                let step =
                    self.blocks_in
                        .handle(now.instant, peer, key, b1, msg.size1(), msg.payload);
                ShardMetrics::set(&self.metrics.block1_assemblies, self.blocks_in.len() as i64);
                match step {
                    Block1Step::Continue(b) => {
                        let r = MessageBuilder::new(MsgType::Ack, Code::CONTINUE)
                            .token(msg.token)
                            .block1(b);
                        return self.ex.respond(now.instant, peer, msg, r, true, protected);
                    }
                    Block1Step::TooLarge => {
                        ShardMetrics::inc(&self.metrics.block1_too_large);
                        // RFC 7959 §2.9.3: 4.13 with Size1 = what we accept.
                        let r = MessageBuilder::new(MsgType::Ack, Code::REQUEST_ENTITY_TOO_LARGE)
                            .token(msg.token)
                            .size1(self.cfg.max_body as u32);
                        return self.ex.respond(now.instant, peer, msg, r, true, protected);
                    }
                    Block1Step::Incomplete => {
                        ShardMetrics::inc(&self.metrics.block1_incomplete);
                        return self.reply_error(
                            now,
                            peer,
                            msg,
                            Code::REQUEST_ENTITY_INCOMPLETE,
                            "block missing",
                            protected,
                        );
                    }
                    Block1Step::Busy => return self.reply_busy(now, peer, msg, protected),
                    Block1Step::Complete(body) => {
                        // The final response echoes the last block (§2.3).
                        self.ex.echo_block1(peer, msg.message_id, b1);
                        assembled = body;
                        let mut m = *msg;
                        m.payload = &assembled;
                        whole = m;
                        // Should the registration live on another shard,
                        // the request goes there whole: the same message
                        // without Block1 / Size1 and with the full body.
                        reencoded = without_blocks(&whole);
                        raw = &reencoded;
                        &whole
                    }
                }
            }
            _ => msg,
        };
        let mut path = msg.uri_path();
        let first = path.next();
        let second = path.next();
        let third = path.next();
        match (first, second, third, msg.code) {
            (Some(b"rd"), None, None, Code::POST) => {
                self.register(now, ctx, peer, identity, msg, protected)
            }
            (Some(b"rd"), Some(loc), None, Code::POST | Code::DELETE) => {
                let Some(id) = parse_location(loc) else {
                    ShardMetrics::inc(&self.metrics.update_unknown);
                    return self.reply_error(
                        now,
                        peer,
                        msg,
                        Code::NOT_FOUND,
                        "unknown registration",
                        protected,
                    );
                };
                if !self.regs.contains(id) {
                    return self
                        .route_elsewhere(now, peer, identity, msg, raw, id, route, protected);
                }
                if msg.code == Code::POST {
                    self.update(now, ctx, peer, identity, msg, id)
                } else {
                    self.deregister(now, ctx, peer, identity, msg, id)
                }
            }
            (Some(b"dp"), None, None, Code::POST) => self.send(now, ctx, peer, identity, msg),
            (Some(b"fw"), Some(name), None, Code::GET) => {
                self.serve_firmware(now, peer, identity, msg, name, protected)
            }
            (Some(b"rd"), _, None, _)
            | (Some(b"dp"), None, None, _)
            | (Some(b"fw"), Some(_), None, _) => self.reply_error(
                now,
                peer,
                msg,
                Code::METHOD_NOT_ALLOWED,
                "method not allowed",
                protected,
            ),
            _ => {
                ShardMetrics::inc(&self.metrics.requests_not_found);
                self.reply_error(
                    now,
                    peer,
                    msg,
                    Code::NOT_FOUND,
                    "no such resource",
                    protected,
                )
            }
        }
    }

    /// Replies with an error code. RFC 7252 §5.5.2 allows a diagnostic
    /// payload; it goes only to registered peers, so a spoofed request never
    /// gets a larger answer than it was.
    pub(super) fn reply_error(
        &mut self,
        now: Now,
        peer: PeerId,
        msg: &Message<'_>,
        code: Code,
        diagnostic: &'static str,
        protected: bool,
    ) {
        let mut b = MessageBuilder::new(MsgType::Ack, code).token(msg.token);
        if protected {
            b = b.payload(diagnostic.as_bytes());
        }
        self.ex.respond(now.instant, peer, msg, b, true, protected);
    }

    /// 5.03 with Max-Age (RFC 7252 §5.9.3.4), not cached: the retry after
    /// Max-Age is processed anew.
    pub(super) fn reply_busy(
        &mut self,
        now: Now,
        peer: PeerId,
        msg: &Message<'_>,
        protected: bool,
    ) {
        ShardMetrics::inc(&self.metrics.busy_responses);
        let b = MessageBuilder::new(MsgType::Ack, Code::SERVICE_UNAVAILABLE)
            .token(msg.token)
            .max_age(self.cfg.busy_max_age_s);
        self.ex.respond(now.instant, peer, msg, b, false, protected);
    }

    pub(super) fn refused(&mut self, now: Now) -> bool {
        self.refusals
            .allow(now.instant, &self.metrics, self.cfg.shard)
    }

    /// A request for a registration this shard does not hold: ask the shard
    /// that does (the home shard named by the id, or where the home shard's
    /// pointer says it went). The request is held meanwhile, so the device's
    /// retransmissions are dropped until the answer is decided.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn route_elsewhere(
        &mut self,
        now: Now,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
        raw: &[u8],
        id: RegId,
        route: Route,
        protected: bool,
    ) {
        let deprovisioned = match route {
            Route::Claimed { deprovisioned } => deprovisioned,
            Route::Fresh => false,
        };
        if deprovisioned || self.tombstones.contains_key(&id) {
            ShardMetrics::inc(&self.metrics.update_unknown);
            return self.reply_error(
                now,
                peer,
                msg,
                Code::FORBIDDEN,
                "endpoint no longer provisioned",
                protected,
            );
        }
        let home = self.home_of(id);
        let target = if home == self.cfg.shard {
            self.homed.get(&id).map(|(owner, _)| *owner)
        } else {
            Some(home)
        };
        match (route, target) {
            (Route::Fresh, Some(t)) if t != self.cfg.shard => {
                self.ex.hold(now.instant, peer, msg.message_id, protected);
                ShardMetrics::inc(&self.metrics.claims_sent);
                self.send_to_shard(
                    t,
                    ShardMsg::Claim {
                        id,
                        from: self.cfg.shard,
                        request: Datagram {
                            peer,
                            identity: identity.cloned(),
                            bytes: raw.into(),
                        },
                        hops: 0,
                    },
                );
            }
            _ => {
                // Unknown here and everywhere we can ask (expired, replaced):
                // 4.04 makes the client register again (TS 1.1 Transport
                // §6.2.2).
                ShardMetrics::inc(&self.metrics.update_unknown);
                self.reply_error(
                    now,
                    peer,
                    msg,
                    Code::NOT_FOUND,
                    "unknown registration",
                    protected,
                )
            }
        }
    }

    /// The home shard of `id`, folded onto the current shard count (ids from
    /// a snapshot written with more shards).
    pub(super) fn home_of(&self, id: RegId) -> u16 {
        home_shard(id) % self.cfg.shards.max(1)
    }

    pub(super) fn next_epoch(&mut self, now: Now) -> Epoch {
        self.lamport = (self.lamport + 1).max(now.wall_ms.max(0) as u64 * 1000);
        Epoch {
            counter: self.lamport,
            shard: self.cfg.shard,
        }
    }
}
