//! `corem-lwm2m`: the gateway binary. Thin: parse flags, load config, start the
//! control plane and the shards, wait for signals, shut down cleanly.

use clap::Parser;
use corem_lwm2m::config::Config;
use corem_lwm2m::control::admin::{
    AdminServer, AdminState, EndpointsHook, ProfilesHook, TenantHook,
};
use corem_lwm2m::control::bootstrap::BootstrapStore;
use corem_lwm2m::control::directory::{Directory, Origin};
use corem_lwm2m::control::firmware::FirmwareStore;
use corem_lwm2m::control::profiles::Profiles;
use corem_lwm2m::control::registrations::RegistrationStore;
use corem_lwm2m::control::reload;
use corem_lwm2m::control::rpc::Resolver;
use corem_lwm2m::control::rpc::RpcService;
use corem_lwm2m::control::sessions::SessionStore;
use corem_lwm2m::control::systemd;
use corem_lwm2m::control::topics::TopicManager;
use corem_lwm2m::proto::lwm2m::firmware::UriBases;
use corem_lwm2m::proto::lwm2m::server::ControlMsg;
use corem_lwm2m::shard::runtime;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CORE-M LwM2M gateway: LwM2M/CoAP devices in, Kafka telemetry out.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Gateway configuration (TOML). Without it, built-in defaults are used.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Override gateway.listen (CoAP UDP address).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Override admin.listen (admin HTTP address).
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
    /// Override kafka.brokers.
    #[arg(long)]
    brokers: Option<String>,
    /// Override gateway.shards (0 = one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// Validate the configuration, profiles and provisioning, then exit.
    #[arg(long)]
    check: bool,
    /// Log format: `text` (colour only on a terminal) or `json` (one object
    /// per line, for log shippers). Level from RUST_LOG (default info).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// Swaps the log filter at run time (`[log] level`, SIGHUP).
type LogHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

fn main() {
    let args = Args::parse();
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, log) = tracing_subscriber::reload::Layer::new(filter);
    let reg = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        reg.with(fmt.json().flatten_event(true)).init();
    } else {
        // No ANSI colour codes when the output is a file or a pipe (NO_COLOR
        // also turns them off).
        let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        reg.with(fmt.with_ansi(ansi)).init();
    }
    if let Err(e) = run(args, log) {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}

/// The log filter `[log] level` asks for, unless RUST_LOG is set (it wins).
fn configured_filter(
    cfg: &Config,
) -> anyhow::Result<Option<(String, tracing_subscriber::EnvFilter)>> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(None);
    }
    match &cfg.log.level {
        None => Ok(None),
        Some(l) => tracing_subscriber::EnvFilter::try_new(l)
            .map(|f| Some((l.clone(), f)))
            .map_err(|e| anyhow::anyhow!("log.level {l:?}: {e}")),
    }
}

fn load_directory(cfg: &Config) -> anyhow::Result<Directory> {
    let dir = &cfg.directory.snapshot_dir;
    let (d, origin) = Directory::open(dir).map_err(|e| {
        // Every generation unreadable: refuse to start on an empty directory
        // silently; the operator decides.
        anyhow::anyhow!(
            "{e}; move the snapshot files in {} away to start from the provisioning file",
            dir.display()
        )
    })?;
    match origin {
        Origin::Snapshot {
            path,
            fell_back,
            replayed,
        } => {
            tracing::info!(endpoints = d.len(), snapshot = %path.display(), fell_back, replayed, "directory loaded from snapshot and log");
        }
        Origin::Log { replayed } => {
            tracing::info!(
                endpoints = d.len(),
                replayed,
                "directory loaded from its log"
            );
        }
        Origin::Empty => {
            if let Some(p) = &cfg.directory.provisioning_file {
                let items = Directory::read_provisioning(p)?;
                let n = d.upsert_many(items)?;
                tracing::info!(endpoints = n, file = %p.display(), "directory loaded from provisioning file");
            } else {
                tracing::warn!(
                    "no snapshot and no provisioning file: the directory is empty (use the admin API)"
                );
            }
        }
    }
    Ok(d)
}

fn run(args: Args, log: LogHandle) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    // What a SIGHUP compares the file with: the file as it was at start.
    let started_tree = match &args.config {
        Some(p) => Some(reload::read_tree(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let mut log_level = String::from("info");
    if let Some((level, f)) = configured_filter(&cfg)? {
        log.reload(f)?;
        log_level = level;
    }
    if let Some(l) = args.listen {
        cfg.gateway.listen = l;
    }
    if let Some(a) = args.admin {
        cfg.admin.listen = a;
    }
    if let Some(b) = args.brokers {
        cfg.kafka.brokers = b;
    }
    if let Some(s) = args.shards {
        cfg.gateway.shards = s;
    }
    cfg.check_admin().map_err(anyhow::Error::msg)?;
    cfg.check_bootstrap().map_err(anyhow::Error::msg)?;
    cfg.check_firmware().map_err(anyhow::Error::msg)?;
    let profiles = Arc::new(Profiles::load(cfg.profiles.dir.as_deref())?);
    let directory = Arc::new(load_directory(&cfg)?);
    if args.check {
        if cfg.dtls.enabled {
            // Certificate, key, CA and cipher list load as they will at start.
            let creds: Arc<dyn corem_lwm2m::io::dtls::Credentials> = directory.clone();
            corem_lwm2m::io::dtls::server_context(&cfg.dtls.tls_settings(), creds)?;
        }
        let mut kc = rdkafka::ClientConfig::new();
        corem_lwm2m::sink::kafka::apply_security(&cfg.kafka, &mut kc)?;
        cfg.admin.token().map_err(anyhow::Error::msg)?;
        println!(
            "configuration ok: {} shards, {} endpoints, profiles {:?}",
            cfg.shard_count(),
            directory.len(),
            profiles.names()
        );
        return Ok(());
    }

    let topics = if cfg.kafka.create_topics {
        let tm = Arc::new(TopicManager::new(&cfg.kafka)?);
        let mut tenants: Vec<String> = directory
            .all()
            .values()
            .map(|e| e.tenant_id.clone())
            .collect();
        tenants.sort();
        tenants.dedup();
        // In the background: a broker that is down must not delay start-up.
        let bg = tm.clone();
        std::thread::Builder::new()
            .name("topic-setup".into())
            .spawn(move || {
                while !bg.ensure(&tenants) {
                    std::thread::sleep(Duration::from_secs(5));
                }
            })?;
        Some(tm)
    } else {
        None
    };

    let store = cfg
        .directory
        .persist_registrations
        .then(|| RegistrationStore::new(&cfg.directory.snapshot_dir));
    let sessions = session_store(&cfg);
    let (rpc_tx, rpc_rx) = crossbeam_channel::unbounded();
    let (bs_tx, bs_rx) = crossbeam_channel::unbounded();
    let shards = runtime::start(
        &cfg,
        directory.clone(),
        profiles.clone(),
        store,
        sessions,
        Some(rpc_tx),
        Some(bs_tx),
    )?;
    let control = shards.control();
    let bs_store = BootstrapStore::start(directory.clone(), control.clone(), bs_rx)?;
    let firmware_dir = cfg.firmware_dir();
    let firmware = Arc::new(FirmwareStore::open(
        &firmware_dir,
        cfg.firmware.max_image_bytes,
        cfg.firmware.cache_bytes,
    )?);
    tracing::info!(dir = %firmware_dir.display(), images = firmware.list().len(), "firmware store");
    let fw_bases = firmware_uri_bases(&cfg, shards.local_addr, shards.dtls_addr);
    tracing::info!(coap = ?fw_bases.coap, coaps = ?fw_bases.coaps, "firmware package URIs");
    let rpc = RpcService::start(
        &cfg,
        Resolver::new(directory.clone(), profiles.clone(), Some(firmware.clone())),
        fw_bases,
        control.clone(),
        rpc_rx,
    )?;
    let on_endpoints: EndpointsHook = {
        let c = control.clone();
        Arc::new(move |names: Vec<String>| c.send(ControlMsg::Endpoints(names.into())))
    };
    let on_profiles: ProfilesHook = {
        let c = control.clone();
        Arc::new(move || c.send(ControlMsg::ProfilesChanged))
    };
    let on_tenants: Option<TenantHook> = topics.map(|tm| {
        let h: TenantHook = Arc::new(move |t: &[String]| {
            tm.ensure(t);
        });
        h
    });
    let admin = AdminServer::start(
        &cfg.admin,
        AdminState {
            directory: directory.clone(),
            profiles: profiles.clone(),
            metrics: shards.metrics.clone(),
            snapshot_dir: cfg.directory.snapshot_dir.clone(),
            on_tenants: on_tenants.clone(),
            on_endpoints: Some(on_endpoints.clone()),
            on_profiles: Some(on_profiles),
            rpc: Some(rpc.handle()),
            control: Some(control.clone()),
            counters: None,
            firmware: Some(firmware.clone()),
            firmware_upload_timeout: Duration::from_secs(cfg.firmware.upload_timeout_s.max(1)),
            tap: Some(shards.tap.clone()),
        },
    )?;
    tracing::info!(
        coap = ?shards.local_addr,
        coaps = ?shards.dtls_addr,
        bootstrap = ?shards.bootstrap_addr,
        bootstrap_dtls = ?shards.bootstrap_dtls_addr,
        admin = %admin.addr,
        shards = shards.metrics.len(),
        brokers = %cfg.kafka.brokers,
        "corem-lwm2m ready"
    );
    // systemd (Type=notify): every shard listens and the admin API answers.
    systemd::notify(&format!(
        "READY=1\nSTATUS=serving {} shards, {} endpoints",
        shards.metrics.len(),
        directory.len()
    ));
    systemd::start_watchdog(shards.metrics.clone());

    let term = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(SIGTERM, term.clone())?;
    signal_hook::flag::register(SIGINT, term.clone())?;
    signal_hook::flag::register(SIGHUP, hup.clone())?;
    let interval = Duration::from_secs(cfg.directory.snapshot_interval_s.max(1));
    let mut next_snapshot = Instant::now() + interval;
    let mut next_trim = Instant::now() + Duration::from_secs(30);
    while !term.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        if hup.swap(false, Ordering::AcqRel) {
            systemd::notify("RELOADING=1");
            match profiles.reload() {
                Ok(n) => {
                    tracing::info!(profiles = n, "profiles reloaded (SIGHUP)");
                    control.send(ControlMsg::ProfilesChanged);
                }
                Err(e) => {
                    tracing::error!(error = %e, "profile reload failed; keeping the current profiles")
                }
            }
            if let (Some(path), Some(started)) = (&args.config, &started_tree) {
                reload_config(
                    path,
                    started,
                    &log,
                    &mut log_level,
                    &directory,
                    // The admin API's hooks: new tenants' topics, shards told.
                    on_tenants.as_ref(),
                    &on_endpoints,
                );
            }
            systemd::notify("READY=1");
        }
        if Instant::now() >= next_trim {
            next_trim = Instant::now() + Duration::from_secs(30);
            shards.tap.sweep();
            // librdkafka allocates its message buffers with the C allocator;
            // after a burst (registration storm, broker outage) glibc keeps the
            // freed pages. Hand them back so RSS tracks live state.
            // SAFETY: malloc_trim only releases free memory.
            unsafe {
                libc::malloc_trim(0);
            }
        }
        if Instant::now() >= next_snapshot {
            next_snapshot = Instant::now() + interval;
            if let Err(e) = directory.snapshot_if_changed(&cfg.directory.snapshot_dir) {
                tracing::error!(error = %e, "directory snapshot failed");
            }
        }
    }
    systemd::notify("STOPPING=1");
    tracing::info!("shutting down: stopping shards, flushing Kafka, writing snapshots");
    // Clients tearing down report their brokers gone: not an outage.
    corem_lwm2m::sink::kafka_log::shutting_down();
    shards.shutdown();
    bs_store.stop();
    admin.stop();
    rpc.stop();
    match directory.write_snapshot(&cfg.directory.snapshot_dir) {
        Ok(()) => {
            tracing::info!(dir = %cfg.directory.snapshot_dir.display(), "directory snapshot written")
        }
        Err(e) => tracing::error!(error = %e, "final directory snapshot failed"),
    }
    tracing::info!("bye");
    Ok(())
}

/// SIGHUP, after the profiles: reads the configuration file again, applies
/// `[log] level` and the provisioning file's new endpoints (existing ones
/// are changed through the admin API, never by a reload), and names every
/// other changed key as needing a restart.
fn reload_config(
    path: &std::path::Path,
    started: &toml::Value,
    log: &LogHandle,
    log_level: &mut String,
    directory: &Directory,
    on_tenants: Option<&TenantHook>,
    on_endpoints: &EndpointsHook,
) {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "configuration not reloaded (SIGHUP): the file does not load; nothing changed");
            return;
        }
    };
    if std::env::var_os("RUST_LOG").is_some() && cfg.log.level.is_some() {
        tracing::warn!("log.level is not applied: RUST_LOG is set and wins");
    }
    match configured_filter(&cfg) {
        Ok(Some((level, f))) if level != *log_level => match log.reload(f) {
            Ok(()) => {
                tracing::info!(from = %log_level, to = %level, "log level changed (SIGHUP)");
                *log_level = level;
            }
            Err(e) => tracing::error!(error = %e, "log level not changed"),
        },
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "log level not changed (SIGHUP)"),
    }
    if let Some(p) = &cfg.directory.provisioning_file {
        match Directory::read_provisioning(p) {
            Ok(items) => {
                let new: Vec<_> = items
                    .into_iter()
                    .filter(|i| directory.get(&i.endpoint).is_none())
                    .collect();
                if !new.is_empty() {
                    let names: Vec<String> = new.iter().map(|i| i.endpoint.clone()).collect();
                    let mut tenants: Vec<String> =
                        new.iter().map(|i| i.entry.tenant_id.clone()).collect();
                    tenants.sort();
                    tenants.dedup();
                    match directory.upsert_many(new) {
                        Ok(n) => {
                            tracing::info!(added = n, file = %p.display(), "provisioning: new endpoints added (SIGHUP)");
                            if let Some(h) = on_tenants {
                                h(&tenants);
                            }
                            on_endpoints(names);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "provisioning additions not stored (SIGHUP)")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, file = %p.display(), "provisioning file not read (SIGHUP)")
            }
        }
    }
    match reload::read_tree(path) {
        Ok(now) => {
            for key in reload::restart_needed(started, &now) {
                tracing::warn!(key = %key, "configuration changed: needs a restart to apply (systemctl restart corem-lwm2m)");
            }
        }
        Err(e) => tracing::error!(error = %e, "configuration not compared (SIGHUP)"),
    }
}

/// The DTLS session store, when a session key is configured (file or
/// environment variable). A key that cannot be read is logged (never its
/// value) and sessions are then not kept across restarts.
fn session_store(cfg: &corem_lwm2m::config::Config) -> Option<std::sync::Arc<SessionStore>> {
    let d = &cfg.dtls;
    if !d.enabled {
        return None;
    }
    let key = if let Some(var) = &d.session_key_env {
        match std::env::var(var) {
            Ok(k) => k,
            Err(_) => {
                tracing::error!(variable = %var, "dtls.session_key_env is not set: DTLS sessions will not survive a restart");
                return None;
            }
        }
    } else if let Some(f) = &d.session_key_file {
        match std::fs::read_to_string(f) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(file = %f.display(), error = %e, "dtls.session_key_file unreadable: DTLS sessions will not survive a restart");
                return None;
            }
        }
    } else {
        return None;
    };
    match SessionStore::new(&cfg.directory.snapshot_dir, &key) {
        Ok(s) => Some(std::sync::Arc::new(s)),
        Err(e) => {
            tracing::error!(error = %e, "DTLS session key refused: DTLS sessions will not survive a restart");
            None
        }
    }
}

/// Where devices reach the gateway's firmware images: `firmware.coap_uri`
/// / `coaps_uri`, else the listen address when it names one IP (a
/// wildcard bind says nothing a device could use).
fn firmware_uri_bases(
    cfg: &corem_lwm2m::config::Config,
    plain: Option<std::net::SocketAddr>,
    dtls: Option<std::net::SocketAddr>,
) -> UriBases {
    let from = |configured: &Option<String>, addr: Option<std::net::SocketAddr>, scheme: &str| {
        configured
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_string())
            .or_else(|| {
                addr.filter(|a| !a.ip().is_unspecified())
                    .map(|a| format!("{scheme}://{a}"))
            })
    };
    UriBases {
        coap: from(&cfg.firmware.coap_uri, plain, "coap"),
        coaps: from(&cfg.firmware.coaps_uri, dtls, "coaps"),
    }
}
