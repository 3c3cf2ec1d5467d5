//! Firmware campaigns: one `firmware_update` RPC per device of a list (or
//! of a tenant + profile selector), at most `concurrency` unfinished at a
//! time, paused when the failure rate passes a threshold. Sans-IO: the RPC
//! service feeds it the statuses of the RPCs it asked for and submits the
//! requests it polls; each device's update is an ordinary RPC (durable,
//! run once, with its statuses on `device.rpc.status.{tenant}`), named
//! `{campaign_id}:{index}` so a restart re-submitting it finds it instead
//! of running it twice.
//!
//! Pause rule: once `min_finished` devices finished, the campaign pauses
//! when `(failed + timed_out + expired) / finished` exceeds
//! `failure_threshold_percent`. Updates already started run to their end;
//! `resume` (optionally with a new threshold) goes on, `cancel` leaves the
//! devices not yet started alone.

use crate::proto::lwm2m::rpc::{RpcRequest, RpcStatus};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as J};
use std::collections::{BTreeMap, HashMap};

/// Longest campaign id (the RPC ids are `{id}:{index}`, at most 128).
pub const MAX_CAMPAIGN_ID: usize = 64;
/// Most devices in one campaign.
pub const MAX_DEVICES: usize = 1_000_000;

/// `POST /v1/firmware/campaigns`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignSpec {
    #[serde(default)]
    pub campaign_id: Option<String>,
    /// The `firmware_update` params: `image`, `method`, `protocol`, `uri`.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub uri: Option<String>,
    /// Explicit device ids...
    #[serde(default)]
    pub devices: Vec<String>,
    /// ...or every device of a tenant (and profile).
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Pause above this failure rate (percent of finished updates); unset:
    /// never pause.
    #[serde(default)]
    pub failure_threshold_percent: Option<f64>,
    /// Updates finished before the threshold applies.
    #[serde(default = "default_min_finished")]
    pub min_finished: usize,
    /// Each device's RPC timeout (default: `firmware.default_timeout_s`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

fn default_concurrency() -> usize {
    100
}

fn default_min_finished() -> usize {
    10
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    pub tenant_id: String,
    #[serde(default)]
    pub profile: Option<String>,
}

impl CampaignSpec {
    /// The RPC params every device gets.
    pub fn params(&self) -> J {
        let mut m = serde_json::Map::new();
        for (k, v) in [
            ("image", &self.image),
            ("method", &self.method),
            ("protocol", &self.protocol),
            ("uri", &self.uri),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), J::String(v.clone()));
            }
        }
        J::Object(m)
    }

    /// Field checks (the firmware params are checked by the caller).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(id) = &self.campaign_id {
            if id.is_empty()
                || id.len() > MAX_CAMPAIGN_ID
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(format!(
                    "campaign_id must be 1..={MAX_CAMPAIGN_ID} characters of [A-Za-z0-9._-]"
                ));
            }
        }
        if self.concurrency == 0 || self.concurrency > 100_000 {
            return Err("concurrency must be 1..=100000".into());
        }
        if let Some(t) = self.failure_threshold_percent {
            if !(0.0..=100.0).contains(&t) {
                return Err("failure_threshold_percent must be 0..=100".into());
            }
        }
        match (&self.selector, self.devices.is_empty()) {
            (Some(_), false) => Err("give devices or selector, not both".into()),
            (None, true) => Err(
                "devices (a list of device ids) or selector ({tenant_id, profile}) is required"
                    .into(),
            ),
            _ if self.devices.len() > MAX_DEVICES => {
                Err(format!("at most {MAX_DEVICES} devices per campaign"))
            }
            _ => Ok(()),
        }
    }
}

/// A device of a campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub device_id: String,
    pub tenant_id: String,
    /// `None`: not started yet.
    pub status: Option<RpcStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    Running,
    Paused,
    Completed,
    Cancelled,
}

/// One campaign (serialized as is into the campaigns file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Campaign {
    pub campaign_id: String,
    pub params: J,
    pub concurrency: usize,
    pub failure_threshold_percent: Option<f64>,
    pub min_finished: usize,
    pub timeout_ms: Option<u64>,
    pub state: CampaignState,
    pub reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub targets: Vec<Target>,
    /// Targets before this index were started.
    pub next: usize,
    /// Started and not finished (recounted at load).
    #[serde(skip)]
    active: usize,
    /// Finished, and of those failed (recounted at load).
    #[serde(skip)]
    finished: usize,
    #[serde(skip)]
    failed: usize,
}

fn is_failure(s: RpcStatus) -> bool {
    matches!(
        s,
        RpcStatus::Failed | RpcStatus::TimedOut | RpcStatus::Expired
    )
}

impl Campaign {
    pub fn rpc_id(&self, index: usize) -> String {
        format!("{}:{index}", self.campaign_id)
    }

    fn count_active(&self) -> usize {
        self.targets[..self.next]
            .iter()
            .filter(|t| !t.status.is_some_and(|s| s.is_terminal()))
            .count()
    }

    /// Devices per status (`pending`: not started).
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut c: BTreeMap<&'static str, usize> = BTreeMap::new();
        for k in [
            "pending",
            "queued",
            "sent",
            "downloading",
            "downloaded",
            "updating",
            "succeeded",
            "failed",
            "timed_out",
            "expired",
        ] {
            c.insert(k, 0);
        }
        for t in &self.targets {
            let k = t.status.map_or("pending", |s| s.as_str());
            *c.entry(k).or_default() += 1;
        }
        c
    }

    /// The API's view: settings, state, counts, the first failures.
    pub fn view(&self) -> J {
        let finished = self.finished;
        let failures: Vec<J> = self
            .targets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.status.is_some_and(is_failure))
            .take(20)
            .map(|(i, t)| {
                json!({
                    "device_id": t.device_id,
                    "rpc_id": self.rpc_id(i),
                    "status": t.status.map(|s| s.as_str()),
                })
            })
            .collect();
        json!({
            "campaign_id": self.campaign_id,
            "params": self.params,
            "state": self.state,
            "reason": self.reason,
            "devices": self.targets.len(),
            "concurrency": self.concurrency,
            "failure_threshold_percent": self.failure_threshold_percent,
            "min_finished": self.min_finished,
            "finished": finished,
            "counts": self.counts(),
            "failures": failures,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        })
    }

    fn check(&mut self, now: i64) {
        let (finished, failed) = (self.finished, self.failed);
        if self.state == CampaignState::Running {
            if let Some(t) = self.failure_threshold_percent {
                if finished >= self.min_finished.max(1)
                    && failed as f64 * 100.0 > t * finished as f64
                {
                    self.state = CampaignState::Paused;
                    self.reason = Some(format!(
                        "{failed} of {finished} finished updates failed ({:.1}%), above the {t}% threshold",
                        failed as f64 * 100.0 / finished as f64
                    ));
                    self.updated_at = now;
                    tracing::warn!(campaign = %self.campaign_id, reason = self.reason.as_deref().unwrap_or(""), "firmware campaign paused");
                }
            }
        }
        if matches!(self.state, CampaignState::Running) && finished == self.targets.len() {
            self.state = CampaignState::Completed;
            self.updated_at = now;
            tracing::info!(campaign = %self.campaign_id, devices = self.targets.len(), failed, "firmware campaign completed");
        }
    }
}

/// Every campaign, and which RPC belongs to which device of which one.
#[derive(Default)]
pub struct Campaigns {
    list: BTreeMap<String, Campaign>,
    by_rpc: HashMap<String, (String, usize)>,
    /// Changed since the file was last written.
    pub dirty: bool,
}

impl Campaigns {
    /// From the campaigns file.
    pub fn load(list: Vec<Campaign>) -> Campaigns {
        let mut c = Campaigns::default();
        for mut camp in list {
            camp.next = camp.next.min(camp.targets.len());
            camp.active = camp.count_active();
            camp.finished = camp
                .targets
                .iter()
                .filter(|t| t.status.is_some_and(|s| s.is_terminal()))
                .count();
            camp.failed = camp
                .targets
                .iter()
                .filter(|t| t.status.is_some_and(is_failure))
                .count();
            c.index(&camp);
            c.list.insert(camp.campaign_id.clone(), camp);
        }
        c
    }

    fn index(&mut self, camp: &Campaign) {
        for i in 0..camp.next {
            self.by_rpc
                .insert(camp.rpc_id(i), (camp.campaign_id.clone(), i));
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Campaign> {
        self.list.values()
    }

    pub fn get(&self, id: &str) -> Option<&Campaign> {
        self.list.get(id)
    }

    /// A new campaign over `targets` (device, tenant), validated.
    pub fn create(
        &mut self,
        now: i64,
        spec: &CampaignSpec,
        targets: Vec<(String, String)>,
    ) -> Result<&Campaign, String> {
        spec.validate()?;
        let id = spec
            .campaign_id
            .clone()
            .unwrap_or_else(|| format!("c{now:x}"));
        if self.list.contains_key(&id) {
            return Err(format!("campaign {id:?} exists"));
        }
        if targets.is_empty() {
            return Err("the campaign selects no devices".into());
        }
        let camp = Campaign {
            campaign_id: id.clone(),
            params: spec.params(),
            concurrency: spec.concurrency,
            failure_threshold_percent: spec.failure_threshold_percent,
            min_finished: spec.min_finished,
            timeout_ms: spec.timeout_ms,
            state: CampaignState::Running,
            reason: None,
            created_at: now,
            updated_at: now,
            targets: targets
                .into_iter()
                .map(|(device_id, tenant_id)| Target {
                    device_id,
                    tenant_id,
                    status: None,
                })
                .collect(),
            next: 0,
            active: 0,
            finished: 0,
            failed: 0,
        };
        tracing::info!(campaign = %id, devices = camp.targets.len(), concurrency = camp.concurrency, "firmware campaign created");
        self.list.insert(id.clone(), camp);
        self.dirty = true;
        self.list.get(&id).ok_or_else(|| "lost".into())
    }

    /// The next RPC to submit (a running campaign below its concurrency).
    pub fn poll_request(&mut self, now: i64) -> Option<RpcRequest> {
        for camp in self.list.values_mut() {
            if camp.state != CampaignState::Running || camp.next >= camp.targets.len() {
                continue;
            }
            if camp.active >= camp.concurrency {
                continue;
            }
            let i = camp.next;
            camp.next += 1;
            camp.active += 1;
            camp.updated_at = now;
            let t = &mut camp.targets[i];
            t.status = Some(RpcStatus::Queued);
            let rpc_id = format!("{}:{i}", camp.campaign_id);
            self.by_rpc
                .insert(rpc_id.clone(), (camp.campaign_id.clone(), i));
            self.dirty = true;
            return Some(RpcRequest {
                rpc_id,
                tenant_id: t.tenant_id.clone(),
                device_id: t.device_id.clone(),
                method: crate::control::rpc::FIRMWARE_UPDATE.into(),
                params: camp.params.clone(),
                timeout_ms: camp.timeout_ms,
            });
        }
        None
    }

    /// A status of one of the campaigns' RPCs (others are ignored).
    pub fn handle_status(&mut self, now: i64, rpc_id: &str, status: RpcStatus) {
        let Some((cid, i)) = self.by_rpc.get(rpc_id).cloned() else {
            return;
        };
        let Some(camp) = self.list.get_mut(&cid) else {
            return;
        };
        let Some(t) = camp.targets.get_mut(i) else {
            return;
        };
        if t.status.is_some_and(|s| s.is_terminal()) || t.status == Some(status) {
            return;
        }
        t.status = Some(status);
        camp.updated_at = now;
        self.dirty = true;
        if status.is_terminal() {
            camp.active = camp.active.saturating_sub(1);
            camp.finished += 1;
            if is_failure(status) {
                camp.failed += 1;
            }
            camp.check(now);
        }
    }

    /// `pause`, `resume` (with an optional new threshold) or `cancel`.
    pub fn act(
        &mut self,
        now: i64,
        id: &str,
        action: &str,
        threshold: Option<f64>,
    ) -> Result<&Campaign, String> {
        let camp = self
            .list
            .get_mut(id)
            .ok_or_else(|| format!("no campaign {id:?}"))?;
        match (action, camp.state) {
            ("pause", CampaignState::Running) => {
                camp.state = CampaignState::Paused;
                camp.reason = Some("paused through the API".into());
            }
            ("resume", CampaignState::Paused) => {
                if let Some(t) = threshold {
                    if !(0.0..=100.0).contains(&t) {
                        return Err("failure_threshold_percent must be 0..=100".into());
                    }
                    camp.failure_threshold_percent = Some(t);
                }
                camp.state = CampaignState::Running;
                camp.reason = None;
                camp.check(now);
            }
            ("cancel", CampaignState::Running | CampaignState::Paused) => {
                camp.state = CampaignState::Cancelled;
                camp.reason = Some(format!(
                    "cancelled through the API; {} devices not started",
                    camp.targets.len() - camp.next
                ));
            }
            ("pause" | "resume" | "cancel", s) => {
                return Err(format!("the campaign is {s:?}, it cannot {action}"))
            }
            _ => {
                return Err(format!(
                    "unknown action {action:?}: pause, resume or cancel"
                ))
            }
        }
        camp.updated_at = now;
        self.dirty = true;
        Ok(camp)
    }

    /// The started targets whose status is not final, by rpc_id (checked
    /// against the RPC book after a restart).
    pub fn unfinished(&self) -> Vec<String> {
        self.list
            .values()
            .flat_map(|c| {
                c.targets[..c.next]
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| !t.status.is_some_and(|s| s.is_terminal()))
                    .map(|(i, _)| c.rpc_id(i))
            })
            .collect()
    }

    /// The request of a started target again (after a restart, for an RPC
    /// the book does not know: it was never accepted).
    pub fn request_for(&self, rpc_id: &str) -> Option<RpcRequest> {
        let (cid, i) = self.by_rpc.get(rpc_id)?;
        let camp = self.list.get(cid)?;
        let t = camp.targets.get(*i)?;
        Some(RpcRequest {
            rpc_id: rpc_id.to_string(),
            tenant_id: t.tenant_id.clone(),
            device_id: t.device_id.clone(),
            method: crate::control::rpc::FIRMWARE_UPDATE.into(),
            params: camp.params.clone(),
            timeout_ms: camp.timeout_ms,
        })
    }

    /// The campaigns file's content.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.list.values().collect::<Vec<_>>()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: J) -> CampaignSpec {
        serde_json::from_value(v).unwrap()
    }

    fn targets(n: usize) -> Vec<(String, String)> {
        (0..n).map(|i| (format!("d{i}"), "acme".into())).collect()
    }

    #[test]
    fn concurrency_bounds_what_is_started_and_counts_follow_the_statuses() {
        let mut c = Campaigns::default();
        let s =
            spec(json!({"campaign_id": "c1", "image": "fw", "devices": ["x"], "concurrency": 3}));
        c.create(0, &s, targets(5)).unwrap();
        let reqs: Vec<RpcRequest> = std::iter::from_fn(|| c.poll_request(1)).collect();
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[0].rpc_id, "c1:0");
        assert_eq!(reqs[0].method, "firmware_update");
        assert_eq!(reqs[0].params, json!({"image": "fw"}));
        c.handle_status(2, "c1:0", RpcStatus::Downloading);
        assert!(c.poll_request(2).is_none(), "still 3 unfinished");
        c.handle_status(3, "c1:0", RpcStatus::Succeeded);
        c.handle_status(3, "other:0", RpcStatus::Failed);
        let r = c.poll_request(3).unwrap();
        assert_eq!(r.rpc_id, "c1:3");
        let v = c.get("c1").unwrap().view();
        assert_eq!(v["counts"]["succeeded"], 1);
        assert_eq!(v["counts"]["queued"], 3);
        assert_eq!(v["counts"]["pending"], 1);
        for id in ["c1:1", "c1:2", "c1:3"] {
            c.handle_status(4, id, RpcStatus::Succeeded);
        }
        let r = c.poll_request(4).unwrap();
        c.handle_status(5, &r.rpc_id, RpcStatus::Succeeded);
        let camp = c.get("c1").unwrap();
        assert_eq!(camp.state, CampaignState::Completed);
        assert_eq!(camp.view()["counts"]["succeeded"], 5);
        // Saved and loaded: the same, and the RPC ids still map.
        let back: Vec<Campaign> = serde_json::from_slice(&c.to_json()).unwrap();
        let c2 = Campaigns::load(back);
        assert_eq!(c2.get("c1").unwrap().view(), camp.view());
        assert!(c2.unfinished().is_empty());
    }

    #[test]
    fn failures_above_the_threshold_pause_and_resume_goes_on() {
        let mut c = Campaigns::default();
        let s = spec(json!({"campaign_id": "c2", "image": "fw", "devices": ["x"],
            "concurrency": 10, "failure_threshold_percent": 5.0, "min_finished": 10}));
        c.create(0, &s, targets(100)).unwrap();
        let mut started = 0;
        let mut i = 0;
        while c.get("c2").unwrap().state == CampaignState::Running {
            while let Some(r) = c.poll_request(i) {
                started += 1;
                // Every tenth device fails.
                let st = if started % 10 == 0 {
                    RpcStatus::Failed
                } else {
                    RpcStatus::Succeeded
                };
                c.handle_status(i, &r.rpc_id, st);
                i += 1;
            }
            assert!(i < 1000);
        }
        let camp = c.get("c2").unwrap();
        assert_eq!(camp.state, CampaignState::Paused);
        assert!(
            camp.reason.as_deref().unwrap().contains("5% threshold"),
            "{:?}",
            camp.reason
        );
        assert_eq!(started, 10, "paused at the first failure past min_finished");
        assert!(c.poll_request(i).is_none(), "paused: nothing new starts");
        // Resume with a higher threshold: runs to the end.
        c.act(i, "c2", "resume", Some(20.0)).unwrap();
        while let Some(r) = c.poll_request(i) {
            c.handle_status(i, &r.rpc_id, RpcStatus::Succeeded);
        }
        assert_eq!(c.get("c2").unwrap().state, CampaignState::Completed);
        assert!(c.act(i, "c2", "pause", None).is_err());
        assert!(c.act(i, "nope", "pause", None).is_err());
    }

    #[test]
    fn specs_are_checked() {
        for bad in [
            json!({"image": "a"}),
            json!({"image": "a", "devices": ["x"], "selector": {"tenant_id": "t"}}),
            json!({"image": "a", "devices": ["x"], "concurrency": 0}),
            json!({"image": "a", "devices": ["x"], "failure_threshold_percent": 150}),
            json!({"image": "a", "devices": ["x"], "campaign_id": "a b"}),
        ] {
            assert!(spec(bad.clone()).validate().is_err(), "{bad}");
        }
        assert!(serde_json::from_value::<CampaignSpec>(json!({"imgae": "a"})).is_err());
        let mut c = Campaigns::default();
        let s = spec(json!({"campaign_id": "c", "image": "a", "devices": ["x"]}));
        assert!(c.create(0, &s, vec![]).is_err());
        c.create(0, &s, targets(1)).unwrap();
        assert!(c.create(0, &s, targets(1)).is_err(), "duplicate id");
        c.act(1, "c", "cancel", None).unwrap();
        assert!(c.poll_request(2).is_none());
    }
}
