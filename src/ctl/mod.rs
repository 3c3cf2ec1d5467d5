//! `corem-ctl`: the operator's command line for a running gateway, over the
//! admin API. Human tables by default, `--json` for scripts; exit codes:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done (an RPC waited for: succeeded) |
//! | 1 | refused or failed: the API said no (4xx), or the RPC ended failed / timed_out / expired |
//! | 2 | usage error (bad flags, unreadable input file) |
//! | 3 | the gateway is unreachable, unhealthy or answered 5xx |
//! | 4 | unauthorized (token missing or wrong) |
//! | 5 | not found (device, endpoint, RPC, image, campaign) |

pub mod csv;
pub mod http;
pub mod table;

use clap::{CommandFactory, Parser, Subcommand};
use http::{Endpoint, HttpError, Response};
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};
use table::Table;

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_UNAVAILABLE: i32 = 3;
pub const EXIT_UNAUTHORIZED: i32 = 4;
pub const EXIT_NOT_FOUND: i32 = 5;

const AFTER_HELP: &str = "\
Exit codes: 0 done; 1 refused or failed (4xx, or an RPC that did not succeed);
2 usage; 3 gateway unreachable, unhealthy or 5xx; 4 unauthorized; 5 not found.
Environment: COREM_ADMIN (admin URL), COREM_ADMIN_TOKEN (bearer token).";

/// Operate a corem-lwm2m gateway through its admin API.
#[derive(Parser, Debug)]
#[command(name = "corem-ctl", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// The gateway's admin API.
    #[arg(
        long,
        global = true,
        env = "COREM_ADMIN",
        default_value = "http://127.0.0.1:8080"
    )]
    pub admin: String,
    /// Bearer token (admin.token_file / admin.token_env of the gateway).
    #[arg(long, global = true, env = "COREM_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// ...or a file holding it.
    #[arg(long, global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// Machine-readable output (JSON; one object per line for streams).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Health, shards, devices, throughput, Kafka, memory of the gateway.
    Status,
    /// Devices (provisioned endpoints with their online state).
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// The endpoint directory (provisioning).
    #[command(subcommand)]
    Endpoints(EndpointsCmd),
    /// Platform RPCs (reboot, read, write, execute, ...).
    #[command(subcommand)]
    Rpc(RpcCmd),
    /// Firmware images and update campaigns.
    #[command(subcommand)]
    Firmware(FirmwareCmd),
    /// Live telemetry.
    #[command(subcommand)]
    Telemetry(TelemetryCmd),
    /// Prints a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
pub enum DevicesCmd {
    /// Lists devices (all pages up to --limit).
    List {
        #[arg(long)]
        tenant: Option<String>,
        /// Only online (true) or offline (false) devices.
        #[arg(long)]
        online: Option<bool>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// One device: entry, registration as its shard holds it, RPCs.
    Show { device_id: String },
}

#[derive(Subcommand, Debug)]
pub enum EndpointsCmd {
    /// Lists the directory (credentials redacted).
    List,
    /// Adds or replaces one endpoint.
    Add {
        endpoint: String,
        #[arg(long)]
        device_id: String,
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "default")]
        profile: String,
        #[arg(long)]
        psk_identity: Option<String>,
        /// PSK as hex (never printed back).
        #[arg(long)]
        psk_key_hex: Option<String>,
    },
    /// Removes one endpoint (a registered device is disconnected).
    Remove { endpoint: String },
    /// Bulk upsert from a CSV (header row: endpoint,device_id,tenant_id,
    /// profile,psk_identity,psk_key_hex,...) or a JSON array; all or nothing.
    Import {
        file: std::path::PathBuf,
        /// csv or json (default: by the file's extension).
        #[arg(long)]
        format: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum RpcCmd {
    /// Sends an RPC to a device.
    Send {
        device_id: String,
        /// reboot, factory_reset, read, write, execute, observe, firmware_update, ...
        method: String,
        /// Parameters as JSON, e.g. '{"path":"/3/0/0"}'.
        #[arg(long, default_value = "{}")]
        params: String,
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(long)]
        rpc_id: Option<String>,
        /// Waits for the final status, printing each transition.
        #[arg(long)]
        wait: bool,
    },
    /// One RPC's record.
    Show { rpc_id: String },
    /// A device's RPCs.
    List { device_id: String },
}

#[derive(Subcommand, Debug)]
pub enum FirmwareCmd {
    /// Uploads an image (its sha256 is computed and checked by the gateway).
    Upload {
        file: std::path::PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
    },
    /// Lists the images.
    List,
    /// Removes an image.
    Remove { name: String },
    /// Update campaigns.
    #[command(subcommand)]
    Campaign(CampaignCmd),
}

#[derive(Subcommand, Debug)]
pub enum CampaignCmd {
    /// Starts a campaign over devices (by id) or a tenant (and profile).
    Create {
        #[arg(long)]
        image: String,
        #[arg(long)]
        id: Option<String>,
        /// Comma-separated device ids.
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        profile: Option<String>,
        #[arg(long, default_value_t = 100)]
        concurrency: u32,
        /// Pause when this percentage of finished updates failed.
        #[arg(long)]
        failure_threshold: Option<u32>,
        /// pull (the device downloads) or push (Block1 writes).
        #[arg(long)]
        method: Option<String>,
    },
    List,
    Show {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    Cancel {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TelemetryCmd {
    /// Prints a device's TelemetryPoints as the gateway publishes them.
    Tail {
        #[arg(long)]
        device: String,
        /// Stop after this many points.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
}

/// An outcome: exit code and what to say on stderr.
pub struct Fail(pub i32, pub String);

impl From<HttpError> for Fail {
    fn from(e: HttpError) -> Fail {
        Fail(EXIT_UNAVAILABLE, e.to_string())
    }
}

type Out<'a> = &'a mut dyn Write;

/// Runs the command line; returns the exit code (stdout written to `out`).
pub fn run(cli: Cli, out: Out<'_>) -> i32 {
    match execute(cli, out) {
        Ok(()) => EXIT_OK,
        Err(Fail(code, msg)) => {
            if !msg.is_empty() {
                eprintln!("corem-ctl: {msg}");
            }
            code
        }
    }
}

/// The exit code an API answer means (0 for 2xx).
pub fn code_for(status: u16) -> i32 {
    match status {
        200..=299 => EXIT_OK,
        401 | 403 => EXIT_UNAUTHORIZED,
        404 => EXIT_NOT_FOUND,
        400..=499 => EXIT_FAILED,
        _ => EXIT_UNAVAILABLE,
    }
}

/// The answer if 2xx, else a [`Fail`] with the API's error message.
fn ok(r: Response) -> Result<Response, Fail> {
    let code = code_for(r.status);
    if code == EXIT_OK {
        return Ok(r);
    }
    let v = r.json();
    let msg = v["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| r.text().trim().to_string());
    Err(Fail(
        code,
        format!(
            "{} ({}): {msg}",
            r.status,
            v["code"].as_str().unwrap_or("error")
        ),
    ))
}

fn pct(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

fn print_json(out: Out<'_>, v: &Value) -> Result<(), Fail> {
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_default()
    )
    .map_err(|e| Fail(EXIT_FAILED, e.to_string()))
}

fn w(out: Out<'_>, s: &str) -> Result<(), Fail> {
    out.write_all(s.as_bytes())
        .map_err(|e| Fail(EXIT_FAILED, e.to_string()))
}

fn execute(cli: Cli, out: Out<'_>) -> Result<(), Fail> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| Fail(EXIT_USAGE, format!("--token-file {}: {e}", f.display())))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    if let Cmd::Completion { shell } = &cli.cmd {
        let mut c = Cli::command();
        clap_complete::generate(*shell, &mut c, "corem-ctl", out);
        return Ok(());
    }
    let api = Endpoint::parse(&cli.admin, token).map_err(|e| Fail(EXIT_USAGE, e.to_string()))?;
    let json = cli.json;
    match cli.cmd {
        Cmd::Completion { .. } => Ok(()),
        Cmd::Status => status(&api, json, out),
        Cmd::Devices(c) => devices(&api, json, c, out),
        Cmd::Endpoints(c) => endpoints(&api, json, c, out),
        Cmd::Rpc(c) => rpc(&api, json, c, out),
        Cmd::Firmware(c) => firmware(&api, json, c, out),
        Cmd::Telemetry(TelemetryCmd::Tail {
            device,
            count,
            seconds,
        }) => tail(&api, json, &device, count, seconds, out),
    }
}

// ------------------------------------------------------------ status

/// Sum over every series of `name` (any labels) in Prometheus text.
pub fn prom_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, v) = match l.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let base = series.split('{').next().unwrap_or("");
        if base == name {
            if let Ok(x) = v.parse::<f64>() {
                sum += x;
                found = true;
            }
        }
    }
    found.then_some(sum)
}

fn status(api: &Endpoint, json: bool, out: Out<'_>) -> Result<(), Fail> {
    let health = api.get("/healthz")?;
    let m1 = ok(api.get("/metrics")?)?.text();
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let m2 = ok(api.get("/metrics")?)?.text();
    let dt = t1.elapsed().as_secs_f64();
    let g = |n: &str| prom_sum(&m2, n).unwrap_or(0.0);
    let rate = |n: &str| (g(n) - prom_sum(&m1, n).unwrap_or(0.0)).max(0.0) / dt;
    let version = m2
        .lines()
        .find_map(|l| l.strip_prefix("corem_lwm2m_build_info{version=\""))
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
        .to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let healthy = health.status == 200;
    let v = json!({
        "admin": format!("http://{}:{}", api.host, api.port),
        "healthy": healthy,
        "health": health.text().trim(),
        "version": version,
        "uptime_s": (now - g("process_start_time_seconds")).max(0.0).round(),
        "shards": g("corem_lwm2m_shards"),
        "endpoints": g("corem_lwm2m_directory_endpoints"),
        "registrations": g("corem_lwm2m_registrations_active"),
        "observations": g("corem_lwm2m_observations_active"),
        "dtls_sessions": g("corem_lwm2m_dtls_sessions"),
        "points_per_s": rate("corem_lwm2m_points_published_total"),
        "points_total": g("corem_lwm2m_points_published_total"),
        "kafka_queue": g("corem_lwm2m_kafka_queue"),
        "kafka_delivered_total": g("corem_lwm2m_kafka_delivered_total"),
        "kafka_delivery_failed_total": g("corem_lwm2m_kafka_delivery_failed_total"),
        "rpc_in_flight": g("corem_lwm2m_rpc_in_flight"),
        "rss_bytes": g("process_resident_memory_bytes"),
        "cpu_cores": rate("process_cpu_seconds_total"),
    });
    if json {
        print_json(out, &v)?;
    } else {
        let mut t = Table::kv();
        t.row([
            "gateway".into(),
            format!(
                "{}  {}  version {}  up {}",
                v["admin"].as_str().unwrap_or(""),
                if healthy { "healthy" } else { "UNHEALTHY" },
                version,
                table::duration_s(v["uptime_s"].as_f64().unwrap_or(0.0) as u64)
            ),
        ]);
        t.row(["shards".into(), table::num(g("corem_lwm2m_shards"))]);
        t.row([
            "endpoints".into(),
            format!(
                "{} provisioned",
                table::num(g("corem_lwm2m_directory_endpoints"))
            ),
        ]);
        t.row([
            "devices".into(),
            format!(
                "{} registered, {} observations, {} DTLS sessions",
                table::num(g("corem_lwm2m_registrations_active")),
                table::num(g("corem_lwm2m_observations_active")),
                table::num(g("corem_lwm2m_dtls_sessions"))
            ),
        ]);
        t.row([
            "telemetry".into(),
            format!(
                "{} points/s, {} published",
                table::num(rate("corem_lwm2m_points_published_total").round()),
                table::num(g("corem_lwm2m_points_published_total"))
            ),
        ]);
        t.row([
            "kafka".into(),
            format!(
                "queue {}, delivered {}, failed {}",
                table::num(g("corem_lwm2m_kafka_queue")),
                table::num(g("corem_lwm2m_kafka_delivered_total")),
                table::num(g("corem_lwm2m_kafka_delivery_failed_total"))
            ),
        ]);
        t.row([
            "rpc".into(),
            format!("{} in flight", table::num(g("corem_lwm2m_rpc_in_flight"))),
        ]);
        t.row([
            "process".into(),
            format!(
                "RSS {}, CPU {:.1}% of a core",
                table::bytes(g("process_resident_memory_bytes")),
                rate("process_cpu_seconds_total") * 100.0
            ),
        ]);
        w(out, &t.render())?;
    }
    if healthy {
        Ok(())
    } else {
        Err(Fail(
            EXIT_UNAVAILABLE,
            format!("unhealthy: {}", health.text().trim()),
        ))
    }
}

// ------------------------------------------------------------ devices

fn devices(api: &Endpoint, json: bool, c: DevicesCmd, out: Out<'_>) -> Result<(), Fail> {
    match c {
        DevicesCmd::List {
            tenant,
            online,
            limit,
        } => {
            let mut rows: Vec<Value> = Vec::new();
            let mut cursor: Option<String> = None;
            while rows.len() < limit {
                let page = (limit - rows.len()).min(1000);
                let mut q = format!("/v1/devices?limit={page}");
                if let Some(t) = &tenant {
                    q.push_str(&format!("&tenant={}", pct(t)));
                }
                if let Some(o) = online {
                    q.push_str(&format!("&online={o}"));
                }
                if let Some(c) = &cursor {
                    q.push_str(&format!("&cursor={}", pct(c)));
                }
                let v = ok(api.get(&q)?)?.json();
                rows.extend(v["devices"].as_array().cloned().unwrap_or_default());
                cursor = v["next_cursor"].as_str().map(str::to_string);
                if cursor.is_none() {
                    break;
                }
            }
            if json {
                return print_json(out, &Value::Array(rows));
            }
            let mut t = Table::new([
                "DEVICE_ID",
                "ENDPOINT",
                "TENANT",
                "PROFILE",
                "ONLINE",
                "LAST_SEEN",
                "SHARD",
            ]);
            for d in &rows {
                t.row([
                    table::s(&d["device_id"]),
                    table::s(&d["endpoint"]),
                    table::s(&d["tenant_id"]),
                    table::s(&d["profile"]),
                    if d["online"] == true { "yes" } else { "no" }.into(),
                    table::time_ms(&d["last_seen"]),
                    table::s(&d["shard"]),
                ]);
            }
            w(out, &t.render())
        }
        DevicesCmd::Show { device_id } => {
            let v = ok(api.get(&format!("/v1/devices/{}", pct(&device_id)))?)?.json();
            if json {
                return print_json(out, &v);
            }
            let mut t = Table::kv();
            for k in ["device_id", "endpoint", "tenant_id", "profile"] {
                t.row([k.into(), table::s(&v[k])]);
            }
            t.row([
                "online".into(),
                if v["online"] == true { "yes" } else { "no" }.into(),
            ]);
            t.row(["last_seen".into(), table::time_ms(&v["last_seen"])]);
            if !v["offline_reason"].is_null() {
                t.row(["offline_reason".into(), table::s(&v["offline_reason"])]);
            }
            let r = &v["registration"];
            if r.is_object() {
                for k in [
                    "shard",
                    "address",
                    "dtls",
                    "lwm2m_version",
                    "binding",
                    "lifetime_s",
                    "expires_in_s",
                    "queue_mode",
                ] {
                    if !r[k].is_null() {
                        t.row([k.into(), table::s(&r[k])]);
                    }
                }
                if let Some(objs) = r["objects"].as_array() {
                    let list: Vec<String> = objs.iter().map(table::s).collect();
                    t.row(["objects".into(), list.join(" ")]);
                }
                if let Some(obs) = r["observations"].as_array() {
                    for o in obs {
                        t.row([
                            "observation".into(),
                            format!("{} ({})", table::s(&o["path"]), table::s(&o["origin"])),
                        ]);
                    }
                }
            }
            let pending = v["pending_rpcs"].as_array().map_or(0, |a| a.len());
            t.row(["pending_rpcs".into(), pending.to_string()]);
            if let Some(recent) = v["recent_rpcs"].as_array() {
                for r in recent {
                    t.row([
                        "rpc".into(),
                        format!(
                            "{} {} {}",
                            table::s(&r["rpc_id"]),
                            table::s(&r["method"]),
                            table::s(&r["status"])
                        ),
                    ]);
                }
            }
            w(out, &t.render())
        }
    }
}

// ------------------------------------------------------------ endpoints

fn endpoints(api: &Endpoint, json: bool, c: EndpointsCmd, out: Out<'_>) -> Result<(), Fail> {
    match c {
        EndpointsCmd::List => {
            let v = ok(api.get("/v1/endpoints")?)?.json();
            if json {
                return print_json(out, &v);
            }
            let mut t = Table::new(["ENDPOINT", "DEVICE_ID", "TENANT", "PROFILE", "CREDENTIALS"]);
            if let Some(m) = v.as_object() {
                for (ep, e) in m {
                    let creds = if !e["psk_identity"].is_null() || !e["psk_identity_hex"].is_null()
                    {
                        "psk"
                    } else if !e["x509"].is_null() || !e["x509_sha256"].is_null() {
                        "x509"
                    } else {
                        "-"
                    };
                    t.row([
                        ep.clone(),
                        table::s(&e["device_id"]),
                        table::s(&e["tenant_id"]),
                        table::s(&e["profile"]),
                        creds.into(),
                    ]);
                }
            }
            w(out, &t.render())
        }
        EndpointsCmd::Add {
            endpoint,
            device_id,
            tenant,
            profile,
            psk_identity,
            psk_key_hex,
        } => {
            let mut body = json!({"device_id": device_id, "tenant_id": tenant, "profile": profile});
            if let Some(i) = psk_identity {
                body["psk_identity"] = i.into();
            }
            if let Some(k) = psk_key_hex {
                body["psk_key_hex"] = k.into();
            }
            let r =
                ok(api.send_json("PUT", &format!("/v1/endpoints/{}", pct(&endpoint)), &body)?)?;
            let created = r.status == 201;
            if json {
                print_json(out, &json!({"endpoint": endpoint, "created": created}))
            } else {
                w(
                    out,
                    &format!(
                        "{} {endpoint}\n",
                        if created { "added" } else { "replaced" }
                    ),
                )
            }
        }
        EndpointsCmd::Remove { endpoint } => {
            ok(api.request("DELETE", &format!("/v1/endpoints/{}", pct(&endpoint)), None)?)?;
            if json {
                print_json(out, &json!({"endpoint": endpoint, "removed": true}))
            } else {
                w(out, &format!("removed {endpoint}\n"))
            }
        }
        EndpointsCmd::Import { file, format } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Fail(EXIT_USAGE, format!("{}: {e}", file.display())))?;
            let fmt = format.unwrap_or_else(|| {
                file.extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or("")
                    .to_ascii_lowercase()
            });
            let items: Value = match fmt.as_str() {
                "json" => serde_json::from_str(&text)
                    .map_err(|e| Fail(EXIT_USAGE, format!("{}: {e}", file.display())))?,
                "csv" => csv::endpoints(&text)
                    .map_err(|e| Fail(EXIT_USAGE, format!("{}: {e}", file.display())))?,
                other => return Err(Fail(EXIT_USAGE, format!("--format {other:?}: csv or json"))),
            };
            let n = items.as_array().map_or(0, |a| a.len());
            if n == 0 {
                return Err(Fail(
                    EXIT_USAGE,
                    format!("{}: no endpoints", file.display()),
                ));
            }
            let r = ok(api.send_json("POST", "/v1/endpoints", &items)?)?.json();
            if json {
                print_json(out, &r)
            } else {
                w(
                    out,
                    &format!(
                        "imported {} endpoints from {}\n",
                        r["upserted"].as_u64().unwrap_or(n as u64),
                        file.display()
                    ),
                )
            }
        }
    }
}

// ------------------------------------------------------------ rpc

fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "timed_out" | "expired")
}

fn rpc_line(r: &Value) -> String {
    let mut s = format!(
        "{}  {:<11} {}",
        table::time_ms(&r["updated_at"]),
        table::s(&r["status"]),
        table::s(&r["rpc_id"])
    );
    for k in ["code", "reason"] {
        if !r[k].is_null() {
            s.push_str(&format!("  {k}={}", table::s(&r[k])));
        }
    }
    if let Some(p) = r["progress"].as_object() {
        if let Some(pc) = p.get("percent") {
            s.push_str(&format!("  {pc}%"));
        }
    }
    s
}

fn rpc(api: &Endpoint, json: bool, c: RpcCmd, out: Out<'_>) -> Result<(), Fail> {
    match c {
        RpcCmd::Send {
            device_id,
            method,
            params,
            timeout_ms,
            rpc_id,
            wait,
        } => {
            let params: Value = serde_json::from_str(&params)
                .map_err(|e| Fail(EXIT_USAGE, format!("--params: {e}")))?;
            let mut body = json!({"method": method, "params": params});
            if let Some(t) = timeout_ms {
                body["timeout_ms"] = t.into();
            }
            if let Some(id) = rpc_id {
                body["rpc_id"] = id.into();
            }
            let r = ok(api.send_json(
                "POST",
                &format!("/v1/devices/{}/rpc", pct(&device_id)),
                &body,
            )?)?
            .json();
            let id = r["rpc_id"].as_str().unwrap_or("").to_string();
            if !wait {
                return if json {
                    print_json(out, &r)
                } else {
                    w(out, &format!("{id} {}\n", table::s(&r["status"])))
                };
            }
            // Every transition seen once, in order, until a final status:
            // the acceptance first, then what polling (every 50 ms, then
            // 200 ms) observes; a fast device may go from queued to
            // succeeded between two polls.
            let accepted = json!({
                "rpc_id": id,
                "status": r["status"],
                "updated_at": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0),
            });
            if json {
                w(out, &format!("{accepted}\n"))?;
            } else {
                w(out, &format!("{}\n", rpc_line(&accepted)))?;
            }
            let mut last = format!("{}{}", table::s(&r["status"]), Value::Null);
            let started = Instant::now();
            loop {
                let rec = ok(api.get(&format!("/v1/rpc/{}", pct(&id)))?)?.json();
                let st = rec["status"].as_str().unwrap_or("").to_string();
                let key = format!("{st}{}", rec["progress"]);
                if key != last {
                    last = key;
                    if json {
                        w(out, &format!("{rec}\n"))?;
                    } else {
                        w(out, &format!("{}\n", rpc_line(&rec)))?;
                    }
                }
                if is_terminal(&st) {
                    if !json && !rec["response"].is_null() {
                        w(out, &format!("response: {}\n", rec["response"]))?;
                    }
                    return if st == "succeeded" {
                        Ok(())
                    } else {
                        Err(Fail(EXIT_FAILED, format!("rpc {id} {st}")))
                    };
                }
                std::thread::sleep(if started.elapsed() < Duration::from_secs(2) {
                    Duration::from_millis(50)
                } else {
                    Duration::from_millis(200)
                });
            }
        }
        RpcCmd::Show { rpc_id } => {
            let v = ok(api.get(&format!("/v1/rpc/{}", pct(&rpc_id)))?)?.json();
            if json {
                print_json(out, &v)
            } else {
                let mut t = Table::kv();
                for k in [
                    "rpc_id",
                    "device_id",
                    "method",
                    "status",
                    "code",
                    "reason",
                    "accepted_at",
                    "updated_at",
                ] {
                    if !v[k].is_null() {
                        let val = if k.ends_with("_at") {
                            table::time_ms(&v[k])
                        } else {
                            table::s(&v[k])
                        };
                        t.row([k.into(), val]);
                    }
                }
                if !v["params"].is_null() {
                    t.row(["params".into(), v["params"].to_string()]);
                }
                if !v["response"].is_null() {
                    t.row(["response".into(), v["response"].to_string()]);
                }
                w(out, &t.render())
            }
        }
        RpcCmd::List { device_id } => {
            let v = ok(api.get(&format!("/v1/devices/{}/rpc", pct(&device_id)))?)?.json();
            if json {
                return print_json(out, &v);
            }
            let mut t = Table::new(["RPC_ID", "METHOD", "STATUS", "CODE", "UPDATED"]);
            for r in v["rpcs"].as_array().cloned().unwrap_or_default() {
                t.row([
                    table::s(&r["rpc_id"]),
                    table::s(&r["method"]),
                    table::s(&r["status"]),
                    table::s(&r["code"]),
                    table::time_ms(&r["updated_at"]),
                ]);
            }
            w(out, &t.render())
        }
    }
}

// ------------------------------------------------------------ firmware

fn sha256_hex(data: &[u8]) -> String {
    let d = openssl::sha::sha256(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn firmware(api: &Endpoint, json: bool, c: FirmwareCmd, out: Out<'_>) -> Result<(), Fail> {
    match c {
        FirmwareCmd::Upload {
            file,
            name,
            version,
        } => {
            let data = std::fs::read(&file)
                .map_err(|e| Fail(EXIT_USAGE, format!("{}: {e}", file.display())))?;
            let sum = sha256_hex(&data);
            let path = format!(
                "/v1/firmware/{}?version={}&sha256={sum}",
                pct(&name),
                pct(&version)
            );
            let mut api = api.clone();
            api.timeout = Duration::from_secs(600);
            let v =
                ok(api.request("PUT", &path, Some(("application/octet-stream", &data)))?)?.json();
            if json {
                print_json(out, &v)
            } else {
                w(
                    out,
                    &format!(
                        "uploaded {name} {version}: {} bytes, sha256 {sum}\n",
                        data.len()
                    ),
                )
            }
        }
        FirmwareCmd::List => {
            let v = ok(api.get("/v1/firmware")?)?.json();
            if json {
                return print_json(out, &v);
            }
            let mut t = Table::new(["NAME", "VERSION", "SIZE", "SHA256", "UPLOADED"]);
            for i in v.as_array().cloned().unwrap_or_default() {
                t.row([
                    table::s(&i["name"]),
                    table::s(&i["version"]),
                    table::bytes(i["size"].as_f64().unwrap_or(0.0)),
                    table::s(&i["sha256"]).chars().take(16).collect(),
                    table::time_ms(&i["uploaded_at"]),
                ]);
            }
            w(out, &t.render())
        }
        FirmwareCmd::Remove { name } => {
            ok(api.request("DELETE", &format!("/v1/firmware/{}", pct(&name)), None)?)?;
            if json {
                print_json(out, &json!({"removed": name}))
            } else {
                w(out, &format!("removed {name}\n"))
            }
        }
        FirmwareCmd::Campaign(c) => campaign(api, json, c, out),
    }
}

fn campaign_summary(v: &Value) -> String {
    let counts = v["counts"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!(
        "{}  {}  image {}  {}/{} finished  {}{}",
        table::s(&v["campaign_id"]),
        table::s(&v["state"]),
        table::s(&v["image"]),
        table::s(&v["finished"]),
        table::s(&v["devices"]),
        counts,
        v["reason"]
            .as_str()
            .map(|r| format!("  ({r})"))
            .unwrap_or_default()
    )
}

fn campaign(api: &Endpoint, json: bool, c: CampaignCmd, out: Out<'_>) -> Result<(), Fail> {
    let base = "/v1/firmware/campaigns";
    let act = |id: &str, action: &str| -> Result<Value, Fail> {
        let path = format!("{base}/{}/{action}", pct(id));
        Ok(ok(api.request("POST", &path, None)?)?.json())
    };
    let v = match c {
        CampaignCmd::Create {
            image,
            id,
            devices,
            tenant,
            profile,
            concurrency,
            failure_threshold,
            method,
        } => {
            let mut body = json!({"image": image, "concurrency": concurrency});
            if let Some(id) = id {
                body["campaign_id"] = id.into();
            }
            if !devices.is_empty() {
                body["devices"] = devices.into();
            } else if let Some(t) = tenant {
                let mut sel = json!({"tenant_id": t});
                if let Some(p) = profile {
                    sel["profile"] = p.into();
                }
                body["selector"] = sel;
            } else {
                return Err(Fail(EXIT_USAGE, "--devices or --tenant is required".into()));
            }
            if let Some(f) = failure_threshold {
                body["failure_threshold_percent"] = f.into();
            }
            if let Some(m) = method {
                body["method"] = m.into();
            }
            ok(api.send_json("POST", base, &body)?)?.json()
        }
        CampaignCmd::List => {
            let v = ok(api.get(base)?)?.json();
            if json {
                return print_json(out, &v);
            }
            let mut t = Table::new(["CAMPAIGN", "STATE", "IMAGE", "DEVICES", "FINISHED"]);
            for c in v.as_array().cloned().unwrap_or_default() {
                t.row([
                    table::s(&c["campaign_id"]),
                    table::s(&c["state"]),
                    table::s(&c["image"]),
                    table::s(&c["devices"]),
                    table::s(&c["finished"]),
                ]);
            }
            return w(out, &t.render());
        }
        CampaignCmd::Show { id } => ok(api.get(&format!("{base}/{}", pct(&id)))?)?.json(),
        CampaignCmd::Pause { id } => act(&id, "pause")?,
        CampaignCmd::Resume { id } => act(&id, "resume")?,
        CampaignCmd::Cancel { id } => act(&id, "cancel")?,
    };
    if json {
        print_json(out, &v)
    } else {
        w(out, &format!("{}\n", campaign_summary(&v)))
    }
}

// ------------------------------------------------------------ telemetry

/// One point as a line: time, values, source path.
pub fn point_line(p: &Value) -> String {
    let mut parts = vec![table::time_ms(&p["ts"])];
    for k in ["numeric_values", "string_values", "bool_values"] {
        if let Some(m) = p[k].as_object() {
            for (name, v) in m {
                parts.push(format!("{name}={}", table::s(v)));
            }
        }
    }
    parts.push(format!("({})", table::s(&p["source"]["path"])));
    parts.join("  ")
}

fn tail(
    api: &Endpoint,
    json: bool,
    device: &str,
    count: Option<usize>,
    seconds: Option<u64>,
    out: Out<'_>,
) -> Result<(), Fail> {
    let until = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let mut after = 0u64;
    let mut seen = 0usize;
    loop {
        let left = until.map(|u| u.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) || count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
        let wait = left.map_or(10_000, |l| l.as_millis().min(10_000) as u64);
        let v = ok(api.get(&format!(
            "/v1/devices/{}/telemetry?after={after}&wait_ms={wait}",
            pct(device)
        ))?)?
        .json();
        after = v["next"].as_u64().unwrap_or(after);
        for p in v["points"].as_array().cloned().unwrap_or_default() {
            if count.is_some_and(|c| seen >= c) {
                break;
            }
            seen += 1;
            if json {
                w(out, &format!("{p}\n"))?;
            } else {
                w(out, &format!("{}\n", point_line(&p)))?;
            }
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_and_exit_codes_mean_something() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "corem-ctl",
            "--json",
            "rpc",
            "send",
            "dev-1",
            "reboot",
            "--wait",
        ])
        .unwrap();
        assert!(c.json);
        assert!(matches!(c.cmd, Cmd::Rpc(RpcCmd::Send { wait: true, .. })));
        assert_eq!(code_for(202), EXIT_OK);
        assert_eq!(code_for(400), EXIT_FAILED);
        assert_eq!(code_for(401), EXIT_UNAUTHORIZED);
        assert_eq!(code_for(404), EXIT_NOT_FOUND);
        assert_eq!(code_for(503), EXIT_UNAVAILABLE);
    }

    #[test]
    fn prometheus_sums_and_point_lines() {
        let m = "# TYPE a counter\na_total{shard=\"0\"} 2\na_total{shard=\"1\"} 3\nb 1.5\na_total_x 9\n";
        assert_eq!(prom_sum(m, "a_total"), Some(5.0));
        assert_eq!(prom_sum(m, "b"), Some(1.5));
        assert_eq!(prom_sum(m, "c"), None);
        let p = json!({"ts": 0, "numeric_values": {"temperature": 22.5}, "string_values": {"unit": "C"},
                       "source": {"path": "/3303/0/5700"}});
        let l = point_line(&p);
        assert!(
            l.contains("temperature=22.5") && l.contains("unit=C") && l.ends_with("(/3303/0/5700)"),
            "{l}"
        );
        assert_eq!(pct("urn:imei:1 2"), "urn%3Aimei%3A1%202");
    }
}
