//! Admin HTTP server (control plane, its own thread and port).
//!
//! * `GET /healthz` — 200 `ok` while the gateway runs.
//! * `GET /metrics` — Prometheus text, per-shard counters and gauges.
//! * `GET /v1/endpoints` — the whole directory (JSON object).
//! * `GET|PUT|DELETE /v1/endpoints/{endpoint}` — one endpoint; PUT takes
//!   `{"device_id":..,"tenant_id":..,"profile":..}`.
//! * `POST /v1/endpoints` — bulk upsert, a JSON array of
//!   `{"endpoint":..,"device_id":..,"tenant_id":..,"profile":..}`.
//! * `POST /v1/snapshot` — write the directory snapshot now.
//! * `GET /v1/profiles`, `POST /v1/profiles/reload` — list / reload profiles.
//! * `POST /v1/devices/{device_id}/rpc` — `{method, params, timeout_ms,
//!   rpc_id?}` → 202 `{rpc_id, status}` once durable (a duplicate rpc_id:
//!   200 with its record, not run again).
//! * `GET /v1/rpc/{rpc_id}` — the RPC's record (status, code, response,
//!   reason).
//! * `GET /v1/devices/{device_id}/rpc` — the device's RPCs and its last
//!   reported registration state.
//!
//! Errors are JSON `{"error": "..."}` with 400 / 404 / 500.
//!
//! Directory writes are durable (logged and fsynced) before they are
//! answered, and reach the shards at once: a removed endpoint's registration
//! ends immediately (`deprovisioned`), a changed one is refreshed.

use super::directory::{Directory, EndpointEntry, ProvisionedEndpoint};
use super::profiles::Profiles;
use crate::metrics::{render_prometheus, ShardMetrics};
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tiny_http::{Header, Method, Request, Response, Server};

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
    /// The RPC service (RPC endpoints answer 503 without it).
    pub rpc: Option<super::rpc::RpcHandle>,
}

impl AdminState {
    fn endpoints_changed(&self, names: Vec<String>) {
        if let Some(h) = &self.on_endpoints {
            h(names);
        }
    }
}

/// Largest request body accepted (bulk provisioning of ~100k endpoints).
const MAX_BODY: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin listen {0}: {1}")]
    Listen(SocketAddr, String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub struct AdminServer {
    pub addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl AdminServer {
    pub fn start(listen: SocketAddr, state: AdminState) -> Result<AdminServer, AdminError> {
        let server = Server::http(listen).map_err(|e| AdminError::Listen(listen, e.to_string()))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| AdminError::Listen(listen, "no IP address".into()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("admin-http".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    match server.recv_timeout(Duration::from_millis(200)) {
                        Ok(Some(req)) => handle(&state, req),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "admin http accept failed"),
                    }
                }
            })?;
        Ok(AdminServer {
            addr,
            thread: Some(thread),
            stop,
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn json_header() -> Header {
    Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
        .unwrap_or_else(|_| unreachable!())
}

fn reply(req: Request, status: u16, body: String, json: bool) {
    let mut r = Response::from_string(body).with_status_code(status);
    if json {
        r = r.with_header(json_header());
    }
    if let Err(e) = req.respond(r) {
        tracing::debug!(error = %e, "admin response not delivered");
    }
}

fn error(req: Request, status: u16, msg: &str) {
    reply(
        req,
        status,
        serde_json::json!({ "error": msg }).to_string(),
        true,
    )
}

/// 400 for an invalid entry, 500 when it could not be made durable.
fn dir_error(req: Request, e: super::directory::DirectoryError) {
    let status = match e {
        super::directory::DirectoryError::Invalid(..) => 400,
        _ => 500,
    };
    error(req, status, &e.to_string())
}

fn read_body(req: &mut Request) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    req.as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| e.to_string())?;
    if body.len() as u64 > MAX_BODY {
        return Err("request body too large".into());
    }
    Ok(body)
}

/// Percent-decodes a path segment (endpoint names such as `urn:imei:123` may
/// arrive encoded).
fn pct_decode(s: &str) -> String {
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
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(st: &AdminState, mut req: Request) {
    let url = req.url().split('?').next().unwrap_or("").to_string();
    let method = req.method().clone();
    match (&method, url.as_str()) {
        (Method::Get, "/healthz") => reply(req, 200, "ok\n".into(), false),
        (Method::Get, "/metrics") => {
            let extra = [("directory_endpoints", st.directory.len() as i64)];
            reply(req, 200, render_prometheus(&st.metrics, &extra), false)
        }
        (Method::Get, "/v1/endpoints") => {
            let all = st.directory.all();
            // Keys are never returned (redacted_json).
            let m: std::collections::BTreeMap<&String, serde_json::Value> =
                all.iter().map(|(k, v)| (k, v.redacted_json())).collect();
            reply(
                req,
                200,
                serde_json::to_string(&m).unwrap_or_default(),
                true,
            )
        }
        (Method::Post, "/v1/endpoints") => {
            let body = match read_body(&mut req) {
                Ok(b) => b,
                Err(e) => return error(req, 400, &e),
            };
            let items: Vec<ProvisionedEndpoint> = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return error(req, 400, &format!("body: {e}")),
            };
            let tenants: Vec<String> = items.iter().map(|i| i.entry.tenant_id.clone()).collect();
            let names: Vec<String> = items.iter().map(|i| i.endpoint.clone()).collect();
            match st.directory.upsert_many(items) {
                Ok(n) => {
                    if let Some(h) = &st.on_tenants {
                        h(&tenants);
                    }
                    st.endpoints_changed(names);
                    reply(
                        req,
                        200,
                        serde_json::json!({ "upserted": n }).to_string(),
                        true,
                    )
                }
                Err(e) => dir_error(req, e),
            }
        }
        (Method::Post, "/v1/snapshot") => match st.directory.write_snapshot(&st.snapshot_dir) {
            Ok(()) => reply(
                req,
                200,
                serde_json::json!({ "written": true }).to_string(),
                true,
            ),
            Err(e) => error(req, 500, &e.to_string()),
        },
        (Method::Get, "/v1/profiles") => reply(
            req,
            200,
            serde_json::to_string(&st.profiles.names()).unwrap_or_default(),
            true,
        ),
        (Method::Post, "/v1/profiles/reload") => match st.profiles.reload() {
            Ok(n) => {
                tracing::info!(profiles = n, "profiles reloaded (admin API)");
                if let Some(h) = &st.on_profiles {
                    h();
                }
                reply(
                    req,
                    200,
                    serde_json::json!({ "profiles": n }).to_string(),
                    true,
                )
            }
            Err(e) => error(req, 400, &e.to_string()),
        },
        (_, u) if u.starts_with("/v1/rpc/") => {
            let Some(rpc) = &st.rpc else {
                return error(req, 503, "RPC service not running");
            };
            let id = pct_decode(&u["/v1/rpc/".len()..]);
            match (method, rpc.get(&id)) {
                (Method::Get, Some(r)) => reply(
                    req,
                    200,
                    serde_json::to_string(&r).unwrap_or_default(),
                    true,
                ),
                (Method::Get, None) => error(req, 404, "no such rpc"),
                _ => error(req, 405, "method not allowed"),
            }
        }
        (_, u) if u.starts_with("/v1/devices/") && u.ends_with("/rpc") => {
            let Some(rpc) = st.rpc.clone() else {
                return error(req, 503, "RPC service not running");
            };
            let device = pct_decode(&u["/v1/devices/".len()..u.len() - "/rpc".len()]);
            if device.is_empty() || device.len() > crate::proto::lwm2m::rpc::MAX_DEVICE_ID {
                return error(req, 400, "device_id must be 1..=256 bytes");
            }
            match method {
                Method::Get => {
                    let (list, presence) = rpc.of_device(&device);
                    reply(
                        req,
                        200,
                        serde_json::json!({ "device_id": device, "registration": presence, "rpcs": list })
                            .to_string(),
                        true,
                    )
                }
                Method::Post => {
                    let body = match read_body(&mut req) {
                        Ok(b) => b,
                        Err(e) => return error(req, 400, &e),
                    };
                    let mut r = match crate::proto::lwm2m::rpc::RpcRequest::parse(&body) {
                        Ok(r) => r,
                        Err(e) => return error(req, 400, &e.to_string()),
                    };
                    if !r.device_id.is_empty() && r.device_id != device {
                        return error(req, 400, "device_id in the body differs from the path");
                    }
                    r.device_id = device.clone();
                    if r.tenant_id.is_empty() {
                        match st.directory.by_device(&device) {
                            Some((_, e)) => r.tenant_id = e.tenant_id.clone(),
                            None => return error(req, 404, "no such device"),
                        }
                    }
                    if r.rpc_id.is_empty() {
                        r.rpc_id = new_rpc_id();
                    }
                    match rpc.submit(r) {
                        Ok(rec) => reply(
                            req,
                            202,
                            serde_json::json!({ "rpc_id": &*rec.rpc_id, "status": rec.status })
                                .to_string(),
                            true,
                        ),
                        Err(super::rpc_book::Refusal::Duplicate(rec)) => reply(
                            req,
                            200,
                            serde_json::to_string(&*rec).unwrap_or_default(),
                            true,
                        ),
                        Err(super::rpc_book::Refusal::Invalid(e)) => error(req, 400, &e),
                    }
                }
                _ => error(req, 405, "method not allowed"),
            }
        }
        (_, u) if u.starts_with("/v1/endpoints/") => {
            let ep = pct_decode(&u["/v1/endpoints/".len()..]);
            match method {
                Method::Get => match st.directory.get(&ep) {
                    Some(e) => reply(req, 200, e.redacted_json().to_string(), true),
                    None => error(req, 404, "no such endpoint"),
                },
                Method::Put => {
                    let body = match read_body(&mut req) {
                        Ok(b) => b,
                        Err(e) => return error(req, 400, &e),
                    };
                    let entry: EndpointEntry = match serde_json::from_slice(&body) {
                        Ok(v) => v,
                        Err(e) => return error(req, 400, &format!("body: {e}")),
                    };
                    let tenant = entry.tenant_id.clone();
                    match st.directory.upsert(&ep, entry) {
                        Ok(existed) => {
                            if let Some(h) = &st.on_tenants {
                                h(&[tenant]);
                            }
                            st.endpoints_changed(vec![ep.clone()]);
                            let code = if existed { 200 } else { 201 };
                            reply(
                                req,
                                code,
                                serde_json::json!({ "endpoint": ep }).to_string(),
                                true,
                            )
                        }
                        Err(e) => dir_error(req, e),
                    }
                }
                Method::Delete => match st.directory.remove(&ep) {
                    Ok(true) => {
                        st.endpoints_changed(vec![ep.clone()]);
                        reply(req, 204, String::new(), false)
                    }
                    Ok(false) => error(req, 404, "no such endpoint"),
                    Err(e) => error(req, 500, &e.to_string()),
                },
                _ => error(req, 405, "method not allowed"),
            }
        }
        _ => error(req, 404, "not found"),
    }
}

/// A fresh RPC id: 128 random bits in hex.
fn new_rpc_id() -> String {
    let mut b = [0u8; 16];
    if openssl::rand::rand_bytes(&mut b).is_err() {
        b = rand::random();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::pct_decode;

    #[test]
    fn percent_decoding() {
        assert_eq!(pct_decode("urn%3Aimei%3A123"), "urn:imei:123");
        assert_eq!(pct_decode("urn:imei:1"), "urn:imei:1");
        assert_eq!(pct_decode("a%"), "a%");
        assert_eq!(pct_decode("a%4"), "a%4");
        assert_eq!(pct_decode("%zz"), "%zz");
    }
}
