//! Control-plane changes applied to live registrations (directory entries,
//! profiles) and the shard's snapshot (export at shutdown or periodically,
//! import at start).

use super::*;

impl Server {
    // ------------------------------------------------------------ control

    /// A control-plane change.
    pub fn handle_control(&mut self, now: Now, ctx: &mut Ctx<'_>, msg: ControlMsg) {
        match msg {
            ControlMsg::Endpoints(names) => {
                for name in names.iter() {
                    let Some(id) = self.regs.by_endpoint(name) else {
                        continue;
                    };
                    match ctx.endpoints.get(name.as_str()).cloned() {
                        None => {
                            // De-provisioning takes effect at once: offline
                            // with reason `deprovisioned`, observations
                            // dropped (late notifications get RST), requests
                            // on the location 4.03.
                            self.deprovision(now, ctx, id);
                        }
                        Some(entry) => {
                            let creds = self
                                .regs
                                .get(id)
                                .is_some_and(|r| r.entry.credentials_differ(&entry));
                            if creds {
                                // New credentials end the registration and
                                // its session at once (the device comes back
                                // with a handshake under the new ones).
                                self.end_registration(now, ctx, id, End::CredentialsChanged);
                                continue;
                            }
                            let changed = self.regs.get(id).is_some_and(|r| *r.entry != *entry);
                            if changed {
                                if let Some(r) = self.regs.get_mut(id) {
                                    r.entry = entry;
                                }
                                self.dirty = true;
                                self.plan_observations(now, ctx, id);
                            }
                        }
                    }
                }
            }
            ControlMsg::ProfilesChanged => {
                for id in self.regs.ids() {
                    self.plan_observations(now, ctx, id);
                }
            }
            ControlMsg::Firmware { name, image } => self.set_firmware(name, image),
        }
        self.drain_failures(now);
        self.update_gauges();
    }

    // ------------------------------------------------------------ snapshots

    /// This shard's registrations as plain data.
    pub fn export_snapshot(&self, now: Now) -> ShardSnapshot {
        ShardSnapshot {
            shard: self.cfg.shard,
            saved_at_ms: now.wall_ms,
            lamport: self.lamport,
            registrations: self
                .regs
                .iter()
                .map(|r| r.to_state(now.instant, self.observation_states(now, r.id)))
                .collect(),
            homed: self
                .homed
                .iter()
                .map(|(id, (o, m))| (*id, *o, *m))
                .collect(),
        }
    }

    /// Restores registrations from a snapshot taken `now.wall_ms -
    /// saved_at_ms` ago: lifetimes keep running across the restart; expired
    /// and de-provisioned ones are dropped. Returns how many were restored.
    pub fn import_snapshot(&mut self, now: Now, ctx: &mut Ctx<'_>, snap: &ShardSnapshot) -> usize {
        let elapsed = (now.wall_ms - snap.saved_at_ms).max(0) as u64;
        self.lamport = self.lamport.max(snap.lamport);
        let mut n = 0;
        for st in &snap.registrations {
            if st.expires_in_ms <= elapsed {
                continue;
            }
            let mut st = st.clone();
            st.expires_in_ms -= elapsed;
            for o in &mut st.observations {
                o.window.age_ms = o.window.age_ms.map(|a| a + elapsed);
            }
            if self.import(now, ctx, &st).is_some() {
                n += 1;
            }
        }
        let shards = self.cfg.shards.max(1);
        for (id, owner, moves) in &snap.homed {
            if !self.regs.contains(*id) {
                self.homed.insert(*id, (owner % shards, *moves));
            }
        }
        self.update_gauges();
        n
    }
}
