//! The admin API's routes: plain functions from a request (method, path,
//! query, whole body) to a reply, run on a blocking thread by the server in
//! [`super`]. Every error is JSON `{"code": "...", "message": "..."}`.
//!
//! * `GET /healthz` — 200 `ok` while every shard runs its timers, 503
//!   naming a stalled shard (no token).
//! * `GET /metrics` — Prometheus text: per-shard counters, gauges and
//!   histograms, the RPC service's figures, `process_*`, the admin
//!   server's own counters (no token).
//! * `GET /console/…` — the web console's static files (no token).
//! * `GET /v1/devices/{id}/telemetry?after=&wait_ms=` — live telemetry of
//!   one device (long poll on the sinks' tap).
//! * `GET /v1/endpoints` — the whole directory (JSON object, keys redacted).
//! * `GET|PUT|DELETE /v1/endpoints/{endpoint}` — one endpoint; PUT takes
//!   `{"device_id":..,"tenant_id":..,"profile":..}` plus credentials.
//! * `POST /v1/endpoints` — bulk upsert, a JSON array of
//!   `{"endpoint":..,"device_id":..,"tenant_id":..,"profile":..}`.
//! * `POST /v1/snapshot` — write the directory snapshot now.
//! * `GET /v1/profiles`, `POST /v1/profiles/reload` — list / reload profiles.
//! * `GET /v1/devices?tenant=&online=&cursor=&limit=` — provisioned devices
//!   in device_id order with their online state, `next_cursor` to page on.
//! * `GET /v1/devices/{device_id}` — one device: its entry, online state,
//!   its registration as the owning shard holds it (address, lifetime,
//!   binding, version, object links, observations, the RPC in flight) and
//!   its pending RPCs.
//! * `POST /v1/devices/{device_id}/rpc` — `{method, params, timeout_ms,
//!   rpc_id?}` → 202 `{rpc_id, status}` once durable (a duplicate rpc_id:
//!   200 with its record, not run again).
//! * `GET /v1/rpc/{rpc_id}` — the RPC's record (status, code, response,
//!   reason).
//! * `GET /v1/devices/{device_id}/rpc` — the device's RPCs and its last
//!   reported registration state.
//! * `GET /v1/firmware`, `GET|DELETE /v1/firmware/{name}` — firmware images
//!   (`PUT` streams an upload, see [`super`]).
//! * `POST /v1/firmware/campaigns` — a firmware campaign
//!   ([`crate::control::campaign::CampaignSpec`]) → 201 with its view;
//!   `GET /v1/firmware/campaigns[/{id}]` — counts per state;
//!   `POST /v1/firmware/campaigns/{id}/pause|resume|cancel`.
//!
//! Directory writes are durable (logged and fsynced) before they are
//! answered, and reach the shards at once: a removed endpoint's registration
//! ends immediately (`deprovisioned`), a changed one is refreshed.

use super::AdminCounters;
use crate::control::directory::{Directory, DirectoryError, EndpointEntry, ProvisionedEndpoint};
use crate::control::profiles::Profiles;
use crate::control::rpc::RpcHandle;
use crate::control::rpc_book::Refusal;
use crate::metrics::{render_prometheus, ShardMetrics};
use crate::proto::lwm2m::rpc::{RpcRequest, MAX_DEVICE_ID, MAX_RPC_ID, MAX_TENANT};
use crate::shard::runtime::ControlHandle;
use bytes::Bytes;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Called with the tenant ids of newly provisioned endpoints (topic creation).
pub type TenantHook = Arc<dyn Fn(&[String]) + Send + Sync>;
/// Called with the endpoints that were added, changed or removed, after the
/// change is durable (the shards apply it to live registrations at once).
pub type EndpointsHook = Arc<dyn Fn(Vec<String>) + Send + Sync>;
/// Called after profiles were reloaded.
pub type ProfilesHook = Arc<dyn Fn() + Send + Sync>;

pub struct AdminState {
    pub directory: Arc<Directory>,
    pub profiles: Arc<Profiles>,
    pub metrics: Vec<Arc<ShardMetrics>>,
    pub snapshot_dir: PathBuf,
    pub on_tenants: Option<TenantHook>,
    pub on_endpoints: Option<EndpointsHook>,
    pub on_profiles: Option<ProfilesHook>,
    /// The RPC service (RPC and device endpoints answer 503 without it).
    pub rpc: Option<RpcHandle>,
    /// The shards (a device's registration details come from its shard).
    pub control: Option<ControlHandle>,
    /// Set by the server.
    pub counters: Option<Arc<AdminCounters>>,
    /// Firmware images (`/v1/firmware` answers 503 without it).
    pub firmware: Option<Arc<crate::control::firmware::FirmwareStore>>,
    /// An image upload's body must arrive within this.
    pub firmware_upload_timeout: std::time::Duration,
    /// Live telemetry (`GET /v1/devices/{id}/telemetry`; 503 without it).
    pub tap: Option<Arc<crate::sink::tap::Tap>>,
}

impl AdminState {
    fn endpoints_changed(&self, names: Vec<String>) {
        if let Some(h) = &self.on_endpoints {
            h(names);
        }
    }
}

/// A request as the routes see it: the body read whole already.
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Bytes,
}

pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
}

impl Reply {
    pub fn json(status: u16, v: &impl serde::Serialize) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(v).unwrap_or_default().into(),
        }
    }

    pub fn text(status: u16, s: &str) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::copy_from_slice(s.as_bytes()),
        }
    }

    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: Bytes::new(),
        }
    }

    /// `{"code": code, "message": message}`.
    pub fn error(status: u16, code: &str, message: &str) -> Reply {
        Reply::json(status, &json!({ "code": code, "message": message }))
    }

    fn bad(message: &str) -> Reply {
        Reply::error(400, "bad_request", message)
    }

    fn not_found(message: &str) -> Reply {
        Reply::error(404, "not_found", message)
    }

    pub(super) fn method_not_allowed() -> Reply {
        Reply::error(405, "method_not_allowed", "method not allowed on this path")
    }

    pub(super) fn unavailable(message: &str) -> Reply {
        Reply::error(503, "unavailable", message)
    }
}

/// 400 for an invalid entry, 500 when it could not be made durable.
fn dir_error(e: DirectoryError) -> Reply {
    match e {
        DirectoryError::Invalid(..) => Reply::error(400, "invalid_entry", &e.to_string()),
        _ => Reply::error(500, "storage", &e.to_string()),
    }
}

/// Percent-decodes a path segment or query value (endpoint names such as
/// `urn:imei:123` may arrive encoded); `+` is a space in a query.
pub fn pct_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if plus_is_space && b[i] == b'+' {
            b' '
        } else {
            b[i]
        });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `key` in a query string (last one wins).
pub(super) fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (pct_decode(k, true) == key).then(|| pct_decode(v, true))
        })
        .next_back()
}

/// The web console's static files (compiled in; no build step, no data in
/// them: the page calls the API with the operator's token).
pub fn console(path: &str) -> Option<Reply> {
    let (ct, body): (&'static str, &'static str) = match path {
        "/" | "/console" | "/console/" | "/console/index.html" => (
            "text/html; charset=utf-8",
            include_str!("console/index.html"),
        ),
        "/console/app.js" => (
            "text/javascript; charset=utf-8",
            include_str!("console/app.js"),
        ),
        "/console/style.css" => ("text/css; charset=utf-8", include_str!("console/style.css")),
        _ => return None,
    };
    Some(Reply {
        status: 200,
        content_type: ct,
        body: Bytes::from_static(body.as_bytes()),
    })
}

/// 200 `ok` while every shard runs its timers; 503 with the stalled shard
/// otherwise (the same check feeds the systemd watchdog).
pub fn healthz(st: &AdminState) -> Reply {
    use crate::control::systemd::{shards_healthy, unix_now_s};
    match shards_healthy(&st.metrics, unix_now_s()) {
        Ok(()) => Reply::text(200, "ok\n"),
        Err(why) => Reply::error(503, "unavailable", &why),
    }
}

pub fn metrics(st: &AdminState) -> Reply {
    let extra = [
        (
            "directory_endpoints",
            "endpoints provisioned in the device directory",
            st.directory.len() as i64,
        ),
        (
            "shards",
            "shards (cores) serving devices",
            st.metrics.len() as i64,
        ),
        (
            "kafka_broker_connections_up",
            "broker connections in state UP (librdkafka statistics of the RPC status producer, every 5 s; -1 before the first); 0 while no broker is reachable",
            crate::sink::kafka_log::broker_connections_up(),
        ),
        (
            "telemetry_watched_devices",
            "devices whose live telemetry is being long-polled (corem-ctl telemetry tail, the console)",
            st.tap.as_ref().map_or(0, |t| t.watched()) as i64,
        ),
    ];
    let mut out = render_prometheus(&st.metrics, &extra);
    if let Some(rpc) = &st.rpc {
        rpc.metrics().render(&mut out);
    }
    crate::metrics::render_process(&mut out);
    if let Some(c) = &st.counters {
        for (name, help, v) in [
            ("requests", "admin API requests", &c.requests),
            (
                "unauthorized",
                "admin API requests without a valid token",
                &c.unauthorized,
            ),
            (
                "connections_refused",
                "admin connections closed at admin.max_connections",
                &c.connections_refused,
            ),
            (
                "body_timeouts",
                "admin requests whose body did not arrive in time",
                &c.body_timeouts,
            ),
            ("too_large", "admin requests refused with 413", &c.too_large),
            (
                "busy",
                "admin requests refused with 503 at admin.max_concurrent",
                &c.busy,
            ),
            (
                "idle_closed",
                "admin connections closed idle",
                &c.idle_closed,
            ),
        ] {
            let _ = writeln!(out, "# HELP corem_lwm2m_admin_{name}_total {help}");
            let _ = writeln!(out, "# TYPE corem_lwm2m_admin_{name}_total counter");
            let _ = writeln!(
                out,
                "corem_lwm2m_admin_{name}_total {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
    Reply {
        status: 200,
        content_type: "text/plain; version=0.0.4",
        body: out.into(),
    }
}

pub fn route(st: &AdminState, req: &ApiRequest) -> Reply {
    let m = req.method.as_str();
    let path = req.path.as_str();
    match (m, path) {
        ("GET", "/healthz") => healthz(st),
        ("GET", "/metrics") => metrics(st),
        ("GET", "/v1/endpoints") => {
            let all = st.directory.all();
            // Keys are never returned (redacted_json).
            let m: std::collections::BTreeMap<&String, Value> =
                all.iter().map(|(k, v)| (k, v.redacted_json())).collect();
            Reply::json(200, &m)
        }
        ("POST", "/v1/endpoints") => bulk_upsert(st, &req.body),
        ("POST", "/v1/snapshot") => match st.directory.write_snapshot(&st.snapshot_dir) {
            Ok(()) => Reply::json(200, &json!({ "written": true })),
            Err(e) => Reply::error(500, "storage", &e.to_string()),
        },
        ("GET", "/v1/profiles") => Reply::json(200, &st.profiles.names()),
        ("POST", "/v1/profiles/reload") => match st.profiles.reload() {
            Ok(n) => {
                tracing::info!(profiles = n, "profiles reloaded (admin API)");
                if let Some(h) = &st.on_profiles {
                    h();
                }
                Reply::json(200, &json!({ "profiles": n }))
            }
            Err(e) => Reply::error(400, "invalid_profile", &e.to_string()),
        },
        ("GET", "/v1/devices") => list_devices(st, &req.query),
        ("GET", "/v1/firmware") => match &st.firmware {
            Some(f) => Reply::json(200, &f.list()),
            None => Reply::unavailable("no firmware store"),
        },
        (
            _,
            "/v1/endpoints"
            | "/v1/snapshot"
            | "/v1/profiles"
            | "/v1/profiles/reload"
            | "/v1/devices"
            | "/v1/firmware",
        ) => Reply::method_not_allowed(),
        (_, p) if p == "/v1/firmware/campaigns" || p.starts_with("/v1/firmware/campaigns/") => {
            campaigns(st, m, &p["/v1/firmware/campaigns".len()..], &req.body)
        }
        (_, p) if p.starts_with("/v1/firmware/") => {
            let name = pct_decode(&p["/v1/firmware/".len()..], false);
            firmware_image(st, m, &name)
        }
        (_, p) if p.starts_with("/v1/rpc/") => {
            let Some(rpc) = &st.rpc else {
                return Reply::unavailable("the RPC service is not running");
            };
            let id = pct_decode(&p["/v1/rpc/".len()..], false);
            if m != "GET" {
                return Reply::method_not_allowed();
            }
            if id.is_empty() || id.len() > MAX_RPC_ID {
                return Reply::bad("rpc_id must be 1..=128 bytes");
            }
            match rpc.get(&id) {
                Some(r) => Reply::json(200, &r),
                None => Reply::not_found("no such rpc"),
            }
        }
        (_, p) if between(p, "/v1/devices/", "/rpc").is_some() => {
            let device = pct_decode(between(p, "/v1/devices/", "/rpc").unwrap_or(""), false);
            device_rpc(st, m, &device, &req.body)
        }
        (_, p) if between(p, "/v1/devices/", "/telemetry").is_some() => {
            let device = pct_decode(
                between(p, "/v1/devices/", "/telemetry").unwrap_or(""),
                false,
            );
            if m != "GET" {
                return Reply::method_not_allowed();
            }
            device_telemetry(st, &device, &req.query)
        }
        (_, p) if p.starts_with("/v1/devices/") => {
            let device = pct_decode(&p["/v1/devices/".len()..], false);
            if m != "GET" {
                return Reply::method_not_allowed();
            }
            show_device(st, &device)
        }
        (_, p) if between(p, "/v1/endpoints/", "/bootstrap").is_some() => {
            let ep = pct_decode(
                between(p, "/v1/endpoints/", "/bootstrap").unwrap_or(""),
                false,
            );
            endpoint_bootstrap(st, m, &ep, &req.body)
        }
        (_, p) if p.starts_with("/v1/endpoints/") => {
            let ep = pct_decode(&p["/v1/endpoints/".len()..], false);
            endpoint(st, m, &ep, &req.body)
        }
        _ => Reply::not_found("no such path"),
    }
}

fn bulk_upsert(st: &AdminState, body: &[u8]) -> Reply {
    let items: Vec<ProvisionedEndpoint> = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Reply::bad(&format!("body: {e}")),
    };
    let tenants: Vec<String> = items.iter().map(|i| i.entry.tenant_id.clone()).collect();
    let names: Vec<String> = items.iter().map(|i| i.endpoint.clone()).collect();
    match st.directory.upsert_many(items) {
        Ok(n) => {
            if let Some(h) = &st.on_tenants {
                h(&tenants);
            }
            st.endpoints_changed(names);
            Reply::json(200, &json!({ "upserted": n }))
        }
        Err(e) => dir_error(e),
    }
}

fn endpoint(st: &AdminState, m: &str, ep: &str, body: &[u8]) -> Reply {
    if ep.is_empty() || ep.len() > crate::proto::lwm2m::registration::MAX_ENDPOINT_LEN {
        return Reply::bad("endpoint name must be 1..=256 bytes");
    }
    match m {
        "GET" => match st.directory.get(ep) {
            Some(e) => Reply::json(200, &e.redacted_json()),
            None => Reply::not_found("no such endpoint"),
        },
        "PUT" => {
            let entry: EndpointEntry = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return Reply::bad(&format!("body: {e}")),
            };
            let tenant = entry.tenant_id.clone();
            match st.directory.upsert(ep, entry) {
                Ok(existed) => {
                    if let Some(h) = &st.on_tenants {
                        h(&[tenant]);
                    }
                    st.endpoints_changed(vec![ep.to_string()]);
                    Reply::json(if existed { 200 } else { 201 }, &json!({ "endpoint": ep }))
                }
                Err(e) => dir_error(e),
            }
        }
        "DELETE" => match st.directory.remove(ep) {
            Ok(true) => {
                st.endpoints_changed(vec![ep.to_string()]);
                Reply::empty(204)
            }
            Ok(false) => Reply::not_found("no such endpoint"),
            Err(e) => Reply::error(500, "storage", &e.to_string()),
        },
        _ => Reply::method_not_allowed(),
    }
}

/// `/v1/endpoints/{ep}/bootstrap`: what the bootstrap server writes to the
/// endpoint and the credentials it bootstraps with (keys never returned).
fn endpoint_bootstrap(st: &AdminState, m: &str, ep: &str, body: &[u8]) -> Reply {
    use crate::proto::lwm2m::bootstrap::BootstrapSettings;
    if ep.is_empty() || ep.len() > crate::proto::lwm2m::registration::MAX_ENDPOINT_LEN {
        return Reply::bad("endpoint name must be 1..=256 bytes");
    }
    let Some(cur) = st.directory.get(ep) else {
        return Reply::not_found("no such endpoint");
    };
    let settings = match m {
        "GET" => {
            return match &cur.bootstrap {
                Some(b) => Reply::json(200, &b.redacted_json()),
                None => Reply::not_found("no bootstrap settings (the gateway defaults apply)"),
            }
        }
        "PUT" => match serde_json::from_slice::<BootstrapSettings>(body) {
            Ok(b) => Some(Box::new(b)),
            Err(e) => return Reply::bad(&format!("body: {e}")),
        },
        "DELETE" => None,
        _ => return Reply::method_not_allowed(),
    };
    let deleting = settings.is_none();
    match st.directory.modify(&[ep.to_string()], |_, e| {
        let mut n = e.clone();
        n.bootstrap = settings.clone();
        n
    }) {
        Ok(()) => {
            st.endpoints_changed(vec![ep.to_string()]);
            if deleting {
                Reply::empty(204)
            } else {
                Reply::json(200, &json!({ "endpoint": ep }))
            }
        }
        Err(e) => dir_error(e),
    }
}

fn check_device_id(device: &str) -> Result<(), Reply> {
    if device.is_empty() || device.len() > MAX_DEVICE_ID {
        return Err(Reply::bad("device_id must be 1..=256 bytes"));
    }
    Ok(())
}

fn device_rpc(st: &AdminState, m: &str, device: &str, body: &[u8]) -> Reply {
    let Some(rpc) = st.rpc.clone() else {
        return Reply::unavailable("the RPC service is not running");
    };
    if let Err(r) = check_device_id(device) {
        return r;
    }
    match m {
        "GET" => {
            let (list, presence) = rpc.of_device(device);
            Reply::json(
                200,
                &json!({ "device_id": device, "registration": presence, "rpcs": list }),
            )
        }
        "POST" => {
            let mut r = match RpcRequest::parse(body) {
                Ok(r) => r,
                Err(e) => return Reply::bad(&e.to_string()),
            };
            if !r.device_id.is_empty() && r.device_id != device {
                return Reply::bad("device_id in the body differs from the path");
            }
            r.device_id = device.to_string();
            // The tenant is the device's: a body naming another is refused
            // (its status would go to that tenant's topic).
            match st.directory.by_device(device) {
                Some((_, e)) if r.tenant_id.is_empty() || r.tenant_id == e.tenant_id => {
                    r.tenant_id = e.tenant_id.clone()
                }
                Some(_) => return Reply::bad("tenant_id is not the device's tenant"),
                None => return Reply::not_found("no such device"),
            }
            if r.rpc_id.is_empty() {
                r.rpc_id = new_rpc_id();
            }
            if let Err(e) = r.validate() {
                return Reply::bad(&e.to_string());
            }
            match rpc.submit(r) {
                Ok(rec) => Reply::json(
                    202,
                    &json!({ "rpc_id": &*rec.rpc_id, "status": rec.status }),
                ),
                Err(Refusal::Duplicate(rec)) => Reply::json(200, &*rec),
                Err(Refusal::Invalid(e)) => Reply::bad(&e),
            }
        }
        _ => Reply::method_not_allowed(),
    }
}

/// Largest page of `GET /v1/devices`.
const MAX_PAGE: usize = 1000;
/// Devices looked at per page when filtering by online state (a page may
/// come back short with a cursor to go on).
const MAX_SCAN: usize = 100_000;

/// The part of `p` between `prefix` and `suffix`, when both are there and
/// do not overlap (`/v1/endpoints/bootstrap` is the endpoint `bootstrap`,
/// not an empty name with a `/bootstrap` suffix).
fn between<'a>(p: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    p.strip_prefix(prefix)?.strip_suffix(suffix)
}

/// `/v1/firmware/campaigns[/{id}[/{action}]]`: create (POST), list, show,
/// `pause` / `resume` / `cancel` (POST).
fn campaigns(st: &AdminState, method: &str, rest: &str, body: &[u8]) -> Reply {
    let Some(rpc) = &st.rpc else {
        return Reply::unavailable("the RPC service is not running");
    };
    let parts: Vec<String> = rest
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| pct_decode(s, false))
        .collect();
    let fail = |(code, msg): (u16, String)| {
        let c = match code {
            404 => "not_found",
            409 => "conflict",
            422 => "unprocessable",
            503 => "unavailable",
            _ => "bad_request",
        };
        Reply::error(code, c, &msg)
    };
    match (method, parts.as_slice()) {
        ("POST", []) => {
            let spec: crate::control::campaign::CampaignSpec = match serde_json::from_slice(body) {
                Ok(s) => s,
                Err(e) => return Reply::bad(&format!("not a campaign: {e}")),
            };
            match rpc.campaign_create(spec) {
                Ok(v) => Reply::json(201, &v),
                Err(e) => fail(e),
            }
        }
        ("GET", []) => Reply::json(200, &rpc.campaigns(None)),
        ("GET", [id]) => match rpc.campaigns(Some(id)).pop() {
            Some(v) => Reply::json(200, &v),
            None => Reply::not_found("no such campaign"),
        },
        ("POST", [id, action]) => {
            let threshold = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.get("failure_threshold_percent").and_then(|t| t.as_f64()));
            match rpc.campaign_act(id, action, threshold) {
                Ok(v) => Reply::json(200, &v),
                Err(e) => fail(e),
            }
        }
        (_, [] | [_] | [_, _]) => Reply::method_not_allowed(),
        _ => Reply::not_found("no such route"),
    }
}

/// `GET` / `DELETE /v1/firmware/{name}` (`PUT` streams, in the server).
fn firmware_image(st: &AdminState, method: &str, name: &str) -> Reply {
    let Some(f) = &st.firmware else {
        return Reply::unavailable("no firmware store");
    };
    match method {
        "GET" => match f.meta(name) {
            Some(m) => Reply::json(200, &m),
            None => Reply::error(404, "not_found", &format!("no firmware image {name:?}")),
        },
        "DELETE" => match f.remove(name) {
            Ok(true) => {
                tracing::info!(image = name, "firmware image removed (admin API)");
                Reply::json(200, &json!({ "removed": name }))
            }
            Ok(false) => Reply::error(404, "not_found", &format!("no firmware image {name:?}")),
            Err(e) => Reply::error(500, "storage", &e.to_string()),
        },
        _ => Reply::method_not_allowed(),
    }
}

/// How a refused or failed image upload is answered.
pub(super) fn firmware_error(e: &crate::control::firmware::FirmwareError) -> Reply {
    use crate::control::firmware::FirmwareError as E;
    match e {
        E::BadName(_) | E::BadVersion | E::BadChecksum(_) | E::Empty => {
            Reply::error(400, "invalid_image", &e.to_string())
        }
        E::TooLarge(_) => Reply::error(413, "too_large", &e.to_string()),
        E::Mismatch { .. } => Reply::error(422, "checksum_mismatch", &e.to_string()),
        E::NotFound(_) => Reply::error(404, "not_found", &e.to_string()),
        E::Io { .. } => Reply::error(500, "storage", &e.to_string()),
    }
}

fn list_devices(st: &AdminState, query: &str) -> Reply {
    let Some(rpc) = &st.rpc else {
        return Reply::unavailable("the RPC service is not running");
    };
    let tenant = query_param(query, "tenant").filter(|t| !t.is_empty());
    if tenant.as_ref().is_some_and(|t| t.len() > MAX_TENANT) {
        return Reply::bad("tenant must be at most 64 bytes");
    }
    let online = match query_param(query, "online").as_deref() {
        None | Some("") => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Reply::bad("online must be true or false"),
    };
    let limit = match query_param(query, "limit").as_deref() {
        None | Some("") => 100,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return Reply::bad("limit must be 1..=1000"),
        },
    };
    let cursor = query_param(query, "cursor").filter(|c| !c.is_empty());
    if cursor.as_ref().is_some_and(|c| c.len() > MAX_DEVICE_ID) {
        return Reply::bad("cursor must be at most 256 bytes");
    }
    let mut rows: Vec<Value> = Vec::new();
    let (page, next) = st.directory.devices_page(
        cursor.as_deref(),
        tenant.as_deref(),
        limit,
        MAX_SCAN,
        |chunk| {
            let ids: Vec<String> = chunk.iter().map(|(d, _, _)| d.clone()).collect();
            let pres = rpc.presences(ids);
            let mut keep = Vec::with_capacity(chunk.len());
            for ((device_id, ep, e), p) in chunk.iter().zip(pres) {
                let is_online = p.as_ref().is_some_and(|p| p.online);
                let k = online.is_none_or(|want| want == is_online);
                keep.push(k);
                if k {
                    rows.push(json!({
                        "device_id": device_id,
                        "tenant_id": e.tenant_id,
                        "endpoint": ep,
                        "profile": e.profile,
                        "online": is_online,
                        "last_seen": p.as_ref().map(|p| p.last_seen).filter(|t| *t > 0),
                        "shard": p.as_ref().filter(|p| p.online).map(|p| p.shard),
                    }));
                }
            }
            keep
        },
    );
    debug_assert_eq!(page.len(), rows.len());
    Reply::json(200, &json!({ "devices": rows, "next_cursor": next }))
}

/// Longest `wait_ms` of a telemetry long-poll.
const MAX_TELEMETRY_WAIT_MS: u64 = 25_000;

/// `GET /v1/devices/{id}/telemetry?after=N&wait_ms=M`: the TelemetryPoints
/// the gateway published for the device after cursor `after` (as they went
/// to Kafka), waiting up to `wait_ms` for the first; `{"points": [...],
/// "next": cursor}`. The first call starts watching the device (points
/// from then on; up to 256 kept, forgotten 60 s after the last poll).
fn device_telemetry(st: &AdminState, device: &str, query: &str) -> Reply {
    if let Err(r) = check_device_id(device) {
        return r;
    }
    let Some(tap) = &st.tap else {
        return Reply::unavailable("live telemetry is not available");
    };
    if st.directory.by_device(device).is_none() {
        return Reply::not_found("no such device");
    }
    let num = |k: &str, max: u64| -> Result<u64, Reply> {
        match query_param(query, k).as_deref() {
            None | Some("") => Ok(0),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| Reply::bad(&format!("{k} must be an integer 0..={max}"))),
        }
    };
    let after = match num("after", u64::MAX) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let wait = match num("wait_ms", MAX_TELEMETRY_WAIT_MS) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match tap.poll(device, after, Duration::from_millis(wait)) {
        Some(p) => {
            let points: Vec<Value> = p
                .points
                .iter()
                .filter_map(|b| serde_json::from_slice(b).ok())
                .collect();
            Reply::json(200, &json!({ "points": points, "next": p.next }))
        }
        None => Reply::error(
            503,
            "busy",
            "too many devices are being watched; try again within a minute",
        ),
    }
}

/// How long a shard may take to describe a registration.
const DESCRIBE_WAIT: Duration = Duration::from_secs(2);

fn show_device(st: &AdminState, device: &str) -> Reply {
    if let Err(r) = check_device_id(device) {
        return r;
    }
    let Some((endpoint, entry)) = st.directory.by_device(device) else {
        return Reply::not_found("no such device");
    };
    let Some(rpc) = &st.rpc else {
        return Reply::unavailable("the RPC service is not running");
    };
    let (rpcs, mut presence) = rpc.of_device(device);
    // The shard the book last saw holding it describes the registration;
    // if it moved meanwhile, once more with the newer report.
    let mut view = None;
    for _ in 0..2 {
        let Some(p) = presence.as_ref().filter(|p| p.online) else {
            break;
        };
        if let Some(c) = &st.control {
            view = c.describe(p.shard as usize, &endpoint, DESCRIBE_WAIT);
        }
        if view.is_some() {
            break;
        }
        presence = rpc.of_device(device).1;
    }
    let online = presence.as_ref().is_some_and(|p| p.online);
    let pending: Vec<_> = rpcs.iter().filter(|r| !r.status.is_terminal()).collect();
    let recent: Vec<_> = rpcs
        .iter()
        .rev()
        .filter(|r| r.status.is_terminal())
        .take(10)
        .collect();
    let last_seen = view
        .as_ref()
        .map(|v| v.last_seen)
        .or(presence.as_ref().map(|p| p.last_seen))
        .filter(|t| *t > 0);
    let mut v = entry.redacted_json();
    if let Some(o) = v.as_object_mut() {
        o.insert("endpoint".into(), json!(endpoint));
        o.insert("online".into(), json!(online));
        o.insert("last_seen".into(), json!(last_seen));
        if !online {
            o.insert(
                "offline_reason".into(),
                json!(presence.as_ref().and_then(|p| p.reason)),
            );
        }
        // The shard's own view when it answered; what the book last heard
        // otherwise (a shard busy past DESCRIBE_WAIT).
        let reg = match (&view, &presence) {
            (Some(view), _) => serde_json::to_value(view).unwrap_or_default(),
            (None, Some(p)) if p.online => {
                let mut r = serde_json::to_value(p).unwrap_or_default();
                if let Some(r) = r.as_object_mut() {
                    r.insert("partial".into(), json!(true));
                }
                r
            }
            _ => Value::Null,
        };
        o.insert("registration".into(), reg);
        o.insert("pending_rpcs".into(), json!(pending));
        o.insert("recent_rpcs".into(), json!(recent));
    }
    Reply::json(200, &v)
}

/// A fresh RPC id: 128 random bits in hex.
fn new_rpc_id() -> String {
    let mut b = [0u8; 16];
    if openssl::rand::rand_bytes(&mut b).is_err() {
        b = rand::random();
    }
    crate::proto::lwm2m::endpoint::encode_hex(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths whose prefix and suffix overlap once sliced the path out of
    /// range (found by the `admin_request` fuzz target): they are names.
    #[test]
    fn overlapping_prefix_and_suffix_are_names() {
        let st = AdminState {
            directory: Arc::new(Directory::default()),
            profiles: Arc::new(Profiles::load(None).unwrap()),
            metrics: Vec::new(),
            snapshot_dir: std::env::temp_dir(),
            on_tenants: None,
            on_endpoints: None,
            on_profiles: None,
            rpc: None,
            control: None,
            counters: None,
            firmware: None,
            firmware_upload_timeout: std::time::Duration::from_secs(1),
            tap: None,
        };
        let req = |m: &str, p: &str| ApiRequest {
            method: m.into(),
            path: p.into(),
            query: String::new(),
            body: Bytes::new(),
        };
        assert_eq!(
            route(&st, &req("GET", "/v1/endpoints/bootstrap")).status,
            404
        );
        assert_eq!(
            route(&st, &req("PUT", "/v1/endpoints//bootstrap")).status,
            400
        );
        assert_eq!(route(&st, &req("POST", "/v1/devices/rpc")).status, 405);
        assert_eq!(route(&st, &req("GET", "/v1/devices/rpc")).status, 404);
        assert_eq!(
            between("/v1/devices/x/rpc", "/v1/devices/", "/rpc"),
            Some("x")
        );
        assert_eq!(between("/v1/devices/rpc", "/v1/devices/", "/rpc"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(pct_decode("urn%3Aimei%3A123", false), "urn:imei:123");
        assert_eq!(pct_decode("urn:imei:1", false), "urn:imei:1");
        assert_eq!(pct_decode("a%", false), "a%");
        assert_eq!(pct_decode("a%4", false), "a%4");
        assert_eq!(pct_decode("%zz", false), "%zz");
        assert_eq!(pct_decode("a+b", false), "a+b");
        assert_eq!(pct_decode("a+b%2B", true), "a b+");
    }

    #[test]
    fn query_parameters() {
        let q = "tenant=acme&online=true&cursor=urn%3Aimei%3A1&empty&tenant=beta";
        assert_eq!(query_param(q, "tenant").as_deref(), Some("beta"));
        assert_eq!(query_param(q, "online").as_deref(), Some("true"));
        assert_eq!(query_param(q, "cursor").as_deref(), Some("urn:imei:1"));
        assert_eq!(query_param(q, "empty").as_deref(), Some(""));
        assert_eq!(query_param(q, "limit"), None);
        assert_eq!(query_param("", "x"), None);
    }
}
