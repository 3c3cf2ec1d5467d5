//! Messages between shards: newest-wins takeovers, claims of a registration
//! by the shard a device's datagrams now reach, hand-over as plain data, and
//! the home shard's pointer to where each of its registrations lives.

use super::*;

impl Server {
    // ------------------------------------------------------------ shards

    /// A message from another shard.
    pub fn handle_shard_msg(&mut self, now: Now, ctx: &mut Ctx<'_>, msg: ShardMsg) {
        match msg {
            ShardMsg::Takeover { endpoint, epoch } => {
                self.lamport = self.lamport.max(epoch.counter);
                if let Some(id) = self.regs.by_endpoint(&endpoint) {
                    let mine = self.regs.get(id).map(|r| r.epoch);
                    if mine.is_some_and(|e| e < epoch) {
                        ShardMetrics::inc(&self.metrics.takeovers);
                        tracing::debug!(%endpoint, to_shard = epoch.shard, "registration taken over by a newer one on another shard");
                        self.end_registration(now, ctx, id, End::Replaced);
                    }
                }
            }
            ShardMsg::Claim {
                id,
                from,
                request,
                hops,
            } => {
                if self.regs.contains(id) {
                    let state = self.export(now, ctx, id);
                    ShardMetrics::inc(&self.metrics.registrations_moved_out);
                    if self.home_of(id) == self.cfg.shard {
                        let moves = state.as_ref().map(|s| s.moves).unwrap_or(0);
                        self.homed.insert(id, (from, moves));
                    }
                    self.send_to_shard(
                        from,
                        ShardMsg::Adopt {
                            id,
                            state: state.map(Box::new),
                            deprovisioned: false,
                            request,
                        },
                    );
                    return;
                }
                let forward = (self.home_of(id) == self.cfg.shard)
                    .then(|| self.homed.get(&id).map(|(o, _)| *o))
                    .flatten()
                    .filter(|o| *o != from && *o != self.cfg.shard);
                match forward {
                    Some(owner) if hops < 4 => self.send_to_shard(
                        owner,
                        ShardMsg::Claim {
                            id,
                            from,
                            request,
                            hops: hops + 1,
                        },
                    ),
                    _ => {
                        let deprovisioned = self.tombstones.contains_key(&id);
                        self.send_to_shard(
                            from,
                            ShardMsg::Adopt {
                                id,
                                state: None,
                                deprovisioned,
                                request,
                            },
                        )
                    }
                }
            }
            ShardMsg::Adopt {
                id,
                state,
                deprovisioned,
                request,
            } => {
                if let Some(st) = state {
                    if self.import(now, ctx, &st).is_some() {
                        ShardMetrics::inc(&self.metrics.registrations_moved_in);
                        let home = self.home_of(id);
                        if home == self.cfg.shard {
                            self.homed.remove(&id);
                        } else {
                            self.send_to_shard(
                                home,
                                ShardMsg::Homed {
                                    id,
                                    owner: self.cfg.shard,
                                    moves: st.moves,
                                },
                            );
                        }
                    }
                }
                // Run the held request now that the registration is here (or
                // known to be gone).
                // (The bytes decoded on the shard that received them.)
                if let Ok(msg) = Message::decode(&request.bytes) {
                    self.on_request(
                        now,
                        ctx,
                        request.peer,
                        request.identity.as_ref(),
                        &msg,
                        &request.bytes,
                        Route::Claimed { deprovisioned },
                    );
                }
                self.drain_failures(now);
            }
            ShardMsg::Homed { id, owner, moves } => {
                if self.home_of(id) == self.cfg.shard {
                    if owner == self.cfg.shard {
                        self.homed.remove(&id);
                    } else if self.homed.get(&id).is_none_or(|(_, m)| *m <= moves) {
                        self.homed.insert(id, (owner, moves));
                    }
                }
            }
            ShardMsg::Unhomed { id, moves } => {
                if self.homed.get(&id).is_some_and(|(_, m)| *m <= moves) {
                    self.homed.remove(&id);
                }
            }
        }
    }

    /// Removes `id` from this shard and returns it as plain data.
    pub(super) fn export(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        id: RegId,
    ) -> Option<RegistrationState> {
        let observations = self.observation_states(now, id);
        let reg = self.end_registration(now, ctx, id, End::Moved)?;
        let mut st = reg.to_state(now.instant, observations);
        st.moves += 1;
        Some(st)
    }

    pub(super) fn observation_states(&self, now: Now, id: RegId) -> Vec<ObservationState> {
        let Some(reg) = self.regs.get(id) else {
            return Vec::new();
        };
        reg.observations
            .iter()
            .filter_map(|t| {
                self.obs.get(t).map(|o| ObservationState {
                    token: *t,
                    path: o.path.to_string(),
                    window: o.window.to_state(now.instant),
                    rpc: o.rpc,
                    owner: o.owner.as_ref().map(|x| x.to_string()),
                    composite: self
                        .composite
                        .get(t)
                        .map(|ps| ps.iter().map(|p| p.to_string()).collect())
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Installs a registration from plain data (moved here, or from a
    /// snapshot). Refused when its endpoint is no longer provisioned, or when
    /// a newer registration of the endpoint is already here.
    pub(super) fn import(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        st: &RegistrationState,
    ) -> Option<RegId> {
        let Some(entry) = ctx.endpoints.get(&st.endpoint).cloned() else {
            tracing::info!(shard = self.cfg.shard, endpoint = %st.endpoint, "registration of a de-provisioned endpoint dropped");
            return None;
        };
        self.lamport = self.lamport.max(st.epoch.counter);
        if let Some(local) = self.regs.by_endpoint(&st.endpoint) {
            if self.regs.get(local).is_some_and(|r| r.epoch > st.epoch) {
                return None;
            }
            self.end_registration(now, ctx, local, End::Replaced);
        }
        let mut reg = Registration::from_state(st, entry, now.instant);
        if let Some(other) = self.regs.by_peer(&reg.peer) {
            self.end_registration(now, ctx, other, End::Replaced);
        }
        for o in &st.observations {
            let Some(path) = ResourcePath::parse(&o.path) else {
                continue;
            };
            if self.obs.contains_key(&o.token) {
                continue;
            }
            self.obs.insert(
                o.token,
                Observation {
                    reg: st.id,
                    path,
                    window: ObserveWindow::from_state(&o.window, now.instant),
                    rpc: o.rpc,
                    owner: o.owner.as_deref().map(Arc::from),
                },
            );
            if !o.composite.is_empty() {
                let ps: Vec<ResourcePath> = o
                    .composite
                    .iter()
                    .filter_map(|p| ResourcePath::parse(p))
                    .collect();
                self.composite.insert(o.token, ps.into_boxed_slice());
            }
            reg.observations.push(o.token);
        }
        let id = reg.id;
        self.regs.insert(reg);
        self.dirty = true;
        self.update_gauges();
        self.report_presence(now, id, true, None);
        Some(id)
    }
}
