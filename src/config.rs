//! Gateway configuration (TOML). Every field has a default, so an empty file —
//! or no file — runs a gateway on 0.0.0.0:5683 with one shard per core against
//! a broker on 127.0.0.1:9092. See `config/gateway.toml` for a commented example.

use crate::proto::coap::exchange::ExchangeConfig;
use crate::proto::lwm2m::output::AckPolicy;
use crate::proto::lwm2m::server::ServerConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub dtls: DtlsSection,
    pub coap: CoapConfig,
    pub kafka: KafkaConfig,
    pub directory: DirectoryConfig,
    pub profiles: ProfilesConfig,
    pub admin: AdminConfig,
    pub rpc: RpcConfig,
    pub bootstrap: BootstrapSection,
    pub firmware: FirmwareSection,
    pub log: LogSection,
}

/// `[log]`: the log filter (tracing's EnvFilter syntax, e.g. `info` or
/// `info,corem_lwm2m::proto=debug`). `RUST_LOG`, when set, wins. Reloaded
/// by SIGHUP.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub level: Option<String>,
}

/// `[firmware]`: the image store for LwM2M object 5 updates.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirmwareSection {
    /// Where images live (default: `firmware/` under
    /// `directory.snapshot_dir`).
    pub dir: Option<PathBuf>,
    /// Largest image accepted (413 above).
    pub max_image_bytes: u64,
    /// Images kept in memory for the shards, least recently used first out.
    pub cache_bytes: usize,
    /// An upload's body must arrive within this.
    pub upload_timeout_s: u64,
    /// The Package URI base a pull update writes for plain CoAP devices
    /// (`coap://gw.example.net:5683`; `/fw/{name}` is appended). Unset: the
    /// plain listen address, when it is a specific IP.
    pub coap_uri: Option<String>,
    /// The same for DTLS devices (`coaps://…:5684`). Unset: the DTLS
    /// listen address, when it is a specific IP.
    pub coaps_uri: Option<String>,
    /// A firmware update without news from the device (notification,
    /// block fetched) for this long reads /5/0 (lost notifications, devices
    /// without Observe).
    pub poll_s: u64,
    /// Default `timeout_ms` of a `firmware_update` RPC that gives none
    /// (downloads and reboots take minutes, not the 60 s of other RPCs).
    pub default_timeout_s: u64,
}

impl Default for FirmwareSection {
    fn default() -> Self {
        FirmwareSection {
            dir: None,
            max_image_bytes: 64 << 20,
            cache_bytes: 256 << 20,
            upload_timeout_s: 600,
            coap_uri: None,
            coaps_uri: None,
            poll_s: 30,
            default_timeout_s: 3600,
        }
    }
}

impl Config {
    /// The firmware image directory.
    pub fn firmware_dir(&self) -> PathBuf {
        self.firmware
            .dir
            .clone()
            .unwrap_or_else(|| self.directory.snapshot_dir.join("firmware"))
    }
}

/// `[bootstrap]`: the LwM2M Bootstrap Server (TS 1.1 Core §6.1) on its own
/// ports, one SO_REUSEPORT socket per shard and listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootstrapSection {
    /// Off by default: a server that hands out credentials runs only when
    /// an operator turns it on.
    pub enabled: bool,
    /// Plain CoAP bootstrap listener (NoSec bootstrap).
    pub plain: bool,
    pub listen: SocketAddr,
    /// DTLS bootstrap listener (needs `dtls.enabled`; same certificates
    /// and suites, the endpoints' bootstrap credentials).
    pub dtls: bool,
    pub dtls_listen: SocketAddr,
    /// Written to endpoints whose bootstrap settings name no server:
    /// `coaps://` URI of this gateway for devices with a PSK (or a
    /// generated one)...
    pub server_uri: Option<String>,
    /// ...and `coap://` URI for NoSec devices.
    pub server_uri_plain: Option<String>,
    pub short_server_id: u16,
    pub lifetime_s: u32,
    pub binding: String,
    /// Generate a fresh PSK at each bootstrap for endpoints without their
    /// own server list (recorded as their DTLS credentials before Finish).
    pub generate_psk: bool,
    /// Send Bootstrap-Discover first (1.1 clients; 1.0 clients answer 4.xx
    /// and the sequence goes on).
    pub discover: bool,
    /// Bootstrap-Delete `/` instead of `/0` and `/1` (clients that accept
    /// only that, e.g. npm coap-node).
    pub delete_root: bool,
    pub session_timeout_s: u64,
    pub max_sessions_per_shard: usize,
    /// Write keys over the plain bootstrap listener (off: 4.03).
    pub allow_plain_secrets: bool,
}

impl Default for BootstrapSection {
    fn default() -> Self {
        BootstrapSection {
            enabled: false,
            plain: true,
            listen: "0.0.0.0:5783".parse().unwrap_or_else(|_| unreachable!()),
            dtls: true,
            dtls_listen: "0.0.0.0:5784".parse().unwrap_or_else(|_| unreachable!()),
            server_uri: None,
            server_uri_plain: None,
            short_server_id: 1,
            lifetime_s: 86_400,
            binding: "U".into(),
            generate_psk: false,
            discover: true,
            delete_root: false,
            session_timeout_s: 120,
            max_sessions_per_shard: 10_000,
            allow_plain_secrets: false,
        }
    }
}

/// `[rpc]`: platform RPCs (device management).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// Timeout of an RPC that gives none (`timeout_ms`).
    pub default_timeout_ms: u64,
    /// Finished RPCs are kept this long (duplicate `rpc_id`s, the API)...
    pub retention_s: u64,
    /// ...and at most this many.
    pub max_finished: usize,
    /// Compact the RPC log once it grew by this many bytes.
    pub log_compact_bytes: u64,
    /// Consume RPC requests from `kafka.rpc_request_topic`.
    pub kafka_intake: bool,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            default_timeout_ms: 60_000,
            retention_s: 3600,
            max_finished: 200_000,
            log_compact_bytes: 16 << 20,
            kafka_intake: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Plain CoAP listen address (LwM2M over UDP).
    pub listen: SocketAddr,
    /// Serve plain CoAP at all (`false`: DTLS only).
    pub plain: bool,
    /// Number of shards; 0 = one per available core.
    pub shards: usize,
    /// CPUs to pin shards to, in order; empty = CPUs 0..shards.
    pub cpus: Vec<usize>,
    /// Datagrams read per recvmmsg batch.
    pub recv_batch: usize,
    pub socket_recv_buffer: usize,
    pub socket_send_buffer: usize,
    /// Largest datagram accepted (bytes); larger ones are dropped and
    /// counted (`oversized`), a CON request among them answered 4.13.
    pub max_datagram: usize,
    /// Receive coalescing: while datagrams keep arriving, a shard polls its
    /// socket every this many microseconds instead of waking per datagram
    /// (0 = wake per datagram). Adds at most this much latency.
    pub coalesce_us: u64,
    /// Longest coalescing interval (microseconds). A wake-up costs the same
    /// whatever it carries, so when a poll finds fewer than `recv_batch / 2`
    /// datagrams the interval doubles, up to this, and halves again (down
    /// to `coalesce_us`) when one finds more than `2 × recv_batch`: the
    /// datagrams per wake-up, and so the CPU per datagram, stay about the
    /// same from light to full load. Adds at most this much latency.
    pub coalesce_max_us: u64,
    /// Bound on the time spent flushing Kafka at shutdown.
    pub shutdown_flush_ms: u64,
    /// Seed of the shards' CSPRNG (registration ids, tokens, message IDs).
    /// Unset (the default): seeded from the OS. Set it only to reproduce a
    /// run.
    pub rng_seed: Option<u64>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "0.0.0.0:5683".parse().unwrap_or_else(|_| unreachable!()),
            plain: true,
            shards: 0,
            cpus: Vec::new(),
            recv_batch: 64,
            socket_recv_buffer: 8 << 20,
            socket_send_buffer: 4 << 20,
            max_datagram: 2048,
            coalesce_us: 1000,
            coalesce_max_us: 4000,
            shutdown_flush_ms: 10_000,
            rng_seed: None,
        }
    }
}

/// CoAP over DTLS 1.2 (RFC 7252 §9, RFC 6347) on its own port, one
/// SO_REUSEPORT socket per shard.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DtlsSection {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Gateway certificate chain and key (PEM; ECDSA P-256 for the
    /// ECDHE_ECDSA suites). Without them only PSK suites are offered.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// CA bundle device certificates must chain to.
    pub ca_file: Option<PathBuf>,
    /// OpenSSL cipher string (default: the LwM2M suites, CCM-8 first).
    pub ciphers: Option<String>,
    /// Handshake datagram size.
    pub mtu: u32,
    pub max_handshakes_per_shard: usize,
    pub max_sessions_per_shard: usize,
    /// Handshakes one source address may start per second (0: unlimited).
    pub handshakes_per_ip_per_s: u32,
    pub handshake_timeout_ms: u64,
    /// An established session with no record for this long is dropped
    /// (default: a day, the default LwM2M lifetime, plus two hours).
    pub idle_timeout_s: u64,
    pub cookie_rotate_s: u64,
    /// Sessions are saved at shutdown, encrypted with this key (hex, 32
    /// bytes), and restored at start. The key may also come from the
    /// environment variable named by `session_key_env`. Unset: sessions
    /// are not kept across restarts.
    pub session_key_file: Option<PathBuf>,
    pub session_key_env: Option<String>,
    /// Let devices provisioned with DTLS credentials use plain CoAP (off:
    /// they get 4.03 there, LwM2M TS 1.1 Transport §5.2.1).
    pub allow_plain_with_credentials: bool,
}

impl Default for DtlsSection {
    fn default() -> Self {
        DtlsSection {
            enabled: true,
            listen: "0.0.0.0:5684".parse().unwrap_or_else(|_| unreachable!()),
            cert_file: None,
            key_file: None,
            ca_file: None,
            ciphers: None,
            mtu: 1200,
            max_handshakes_per_shard: 2048,
            max_sessions_per_shard: 1_000_000,
            handshakes_per_ip_per_s: 0,
            handshake_timeout_ms: 30_000,
            idle_timeout_s: 86_400 + 7_200,
            cookie_rotate_s: 60,
            session_key_file: None,
            session_key_env: None,
            allow_plain_with_credentials: false,
        }
    }
}

impl DtlsSection {
    pub fn endpoint_config(&self) -> crate::proto::dtls::DtlsConfig {
        crate::proto::dtls::DtlsConfig {
            max_handshakes: self.max_handshakes_per_shard.max(1),
            max_sessions: self.max_sessions_per_shard.max(1),
            handshakes_per_ip_per_s: self.handshakes_per_ip_per_s,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms.max(100)),
            idle_timeout: Duration::from_secs(self.idle_timeout_s.max(1)),
            cookie_rotate: Duration::from_secs(self.cookie_rotate_s.max(1)),
        }
    }

    pub fn tls_settings(&self) -> crate::io::dtls::TlsSettings {
        crate::io::dtls::TlsSettings {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            ca_file: self.ca_file.clone(),
            ciphers: self.ciphers.clone(),
            mtu: self.mtu,
        }
    }
}

/// CoAP transmission parameters (RFC 7252 §4.8) and LwM2M server behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoapConfig {
    pub ack_timeout_ms: u64,
    pub ack_random_factor: f64,
    pub max_retransmit: u32,
    /// EXCHANGE_LIFETIME (RFC 7252 §4.8.2): how long duplicates are recognised.
    pub exchange_lifetime_s: u64,
    /// Max-Age sent with 5.03 when the Kafka queue is full.
    pub busy_max_age_s: u32,
    /// Seconds added to a registration's lifetime before it expires.
    pub lifetime_grace_s: u64,
    /// Smallest lifetime accepted; smaller values are raised to it.
    pub min_lifetime_s: u32,
    /// Outstanding requests per device (RFC 7252 §4.7 NSTART).
    pub nstart: usize,
    /// Peers remembered by duplicate detection per shard; past it, peers
    /// without a registration are evicted first.
    pub dedup_max_peers: usize,
    /// How long a queue-mode device (binding with Q) listens after it sent
    /// something (TS 1.1 Transport §6.5; MAX_TRANSMIT_WAIT, 93 s).
    pub queue_awake_s: u64,
    /// Block size of block-wise writes to devices and reads from them,
    /// as SZX (RFC 7959: 16 << szx bytes; 6 = 1024). A device asking for
    /// smaller blocks gets them.
    pub block_szx: u8,
    /// Largest body reassembled from blocks (a device's Block2 response, a
    /// Block1 Register / Send to us); larger incoming bodies get 4.13
    /// with Size1 = this.
    pub max_body: usize,
    /// Block1 bodies being received at once per shard (5.03 beyond).
    pub max_block1_assemblies: usize,
}

impl Default for CoapConfig {
    fn default() -> Self {
        CoapConfig {
            ack_timeout_ms: 2000,
            ack_random_factor: 1.5,
            max_retransmit: 4,
            exchange_lifetime_s: 247,
            busy_max_age_s: 5,
            lifetime_grace_s: 0,
            min_lifetime_s: 1,
            nstart: 1,
            dedup_max_peers: 262_144,
            queue_awake_s: 93,
            block_szx: 6,
            max_body: 64 * 1024,
            max_block1_assemblies: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub telemetry_topic: String,
    pub status_topic: String,
    /// RPC requests in (JSON `{rpc_id, tenant_id, device_id, method,
    /// params, timeout_ms}`).
    pub rpc_request_topic: String,
    /// RPC status events out (key = device_id).
    pub rpc_status_topic: String,
    pub client_id: String,
    pub linger_ms: u32,
    pub batch_num_messages: u32,
    /// none, gzip, snappy, lz4, zstd (as built into librdkafka).
    pub compression: String,
    pub message_timeout_ms: u32,
    pub queue_max_messages: u32,
    pub idempotence: bool,
    pub acks: String,
    /// Create the tenant topics at start and when an endpoint is provisioned.
    pub create_topics: bool,
    pub topic_partitions: i32,
    /// When a CON notification or Send is acknowledged: `delivered` (the
    /// broker confirmed the record; survives a gateway crash) or `queued`
    /// (the producer accepted it).
    pub ack_after: AckPolicy,
    /// How often a shard serves delivery reports while records are in
    /// flight (microseconds).
    pub poll_interval_us: u64,
    /// Extra librdkafka properties passed through verbatim.
    pub extra: BTreeMap<String, String>,
    /// TLS to the brokers (`security.protocol` SSL, or SASL_SSL with `sasl`).
    pub tls: Option<KafkaTls>,
    /// SASL authentication (SASL_SSL with `tls`, else SASL_PLAINTEXT).
    pub sasl: Option<KafkaSasl>,
}

/// `[kafka.tls]`: the broker's CA, and a client certificate for mTLS.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaTls {
    /// CA bundle (PEM) the broker certificate must chain to; unset: the
    /// system trust store.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Check the broker's host name against its certificate (default true).
    pub verify_hostname: Option<bool>,
}

/// `[kafka.sasl]`: the password comes from a file or an environment
/// variable, never from this file, and is never logged.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSasl {
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    pub mechanism: String,
    pub username: String,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            telemetry_topic: "telemetry.raw.{tenant_id}".into(),
            status_topic: "device.status.{tenant_id}".into(),
            rpc_request_topic: "device.rpc.requests".into(),
            rpc_status_topic: "device.rpc.status.{tenant_id}".into(),
            client_id: "corem-lwm2m".into(),
            linger_ms: 5,
            batch_num_messages: 10_000,
            compression: "none".into(),
            message_timeout_ms: 300_000,
            queue_max_messages: 100_000,
            idempotence: true,
            acks: "all".into(),
            create_topics: true,
            topic_partitions: 1,
            ack_after: AckPolicy::Delivered,
            poll_interval_us: 1000,
            extra: BTreeMap::new(),
            tls: None,
            sasl: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectoryConfig {
    /// Provisioning file used when no snapshot exists yet.
    pub provisioning_file: Option<PathBuf>,
    /// Where snapshots are written.
    pub snapshot_dir: PathBuf,
    pub snapshot_interval_s: u64,
    /// Persist registrations and observations per shard with the snapshots,
    /// so a restart is invisible to devices.
    pub persist_registrations: bool,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            provisioning_file: None,
            snapshot_dir: PathBuf::from("var/corem-lwm2m"),
            snapshot_interval_s: 30,
            persist_registrations: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ProfilesConfig {
    /// Directory of `*.toml` device profiles (the built-in `default` is always there).
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// A file holding the bearer token every call but `/healthz` and
    /// `/metrics` must carry (`Authorization: Bearer …`).
    pub token_file: Option<PathBuf>,
    /// ...or the environment variable holding it (read when `token_file`
    /// is not set). No token: the API is open (keep it on loopback).
    pub token_env: Option<String>,
    /// A client must send a request's headers within this time.
    pub header_timeout_ms: u64,
    /// ...and its body within this time.
    pub body_timeout_ms: u64,
    /// A connection that moves no byte for this long is closed (a client
    /// that stops reading its response, an idle keep-alive).
    pub idle_timeout_ms: u64,
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// Requests being handled at once (the rest wait, up to the body
    /// timeout, then 503).
    pub max_concurrent: usize,
    /// Largest body of `POST /v1/endpoints` (bulk provisioning); other
    /// calls take at most 1 MiB.
    pub max_body_bytes: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:8080".parse().unwrap_or_else(|_| unreachable!()),
            token_file: None,
            token_env: None,
            header_timeout_ms: 5_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 256,
            max_concurrent: 16,
            max_body_bytes: 64 << 20,
        }
    }
}

impl AdminConfig {
    /// The bearer token, when one is configured. An unreadable file or a
    /// missing variable is an error: starting open by mistake is worse.
    pub fn token(&self) -> Result<Option<String>, String> {
        let t = if let Some(f) = &self.token_file {
            std::fs::read_to_string(f)
                .map_err(|e| format!("admin.token_file {}: {e}", f.display()))?
        } else if let Some(v) = &self.token_env {
            std::env::var(v).map_err(|_| format!("admin.token_env: ${v} is not set"))?
        } else {
            return Ok(None);
        };
        let t = t.trim().to_string();
        if t.len() < 16 {
            return Err("the admin token must be at least 16 characters".into());
        }
        Ok(Some(t))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        let mut c: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e))?;
        // Relative paths in the file are relative to the file's directory.
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = c.directory.provisioning_file.as_mut() {
            fix(p)
        }
        fix(&mut c.directory.snapshot_dir);
        if let Some(p) = c.firmware.dir.as_mut() {
            fix(p)
        }
        if let Some(p) = c.profiles.dir.as_mut() {
            fix(p)
        }
        if let Some(t) = c.kafka.tls.as_mut() {
            for p in [&mut t.ca_file, &mut t.cert_file, &mut t.key_file]
                .into_iter()
                .flatten()
            {
                fix(p)
            }
        }
        if let Some(p) = c.kafka.sasl.as_mut().and_then(|s| s.password_file.as_mut()) {
            fix(p)
        }
        for p in [
            &mut c.dtls.cert_file,
            &mut c.dtls.key_file,
            &mut c.dtls.ca_file,
            &mut c.dtls.session_key_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p)
        }
        Ok(c)
    }

    /// Shards to run: `gateway.shards`, or one per available core; at most
    /// 256 (a registration id names its home shard in 8 bits).
    pub fn shard_count(&self) -> usize {
        let n = if self.gateway.shards > 0 {
            self.gateway.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        };
        n.clamp(1, 256)
    }

    /// The bootstrap server configuration of shard `shard`.
    pub fn bootstrap_config(
        &self,
        shard: usize,
        seed: u64,
        key_seed: [u8; 32],
    ) -> crate::proto::lwm2m::bootstrap::BootstrapConfig {
        let b = &self.bootstrap;
        crate::proto::lwm2m::bootstrap::BootstrapConfig {
            shard: shard as u16,
            exchange: self.server_config(shard, seed).exchange,
            defaults: crate::proto::lwm2m::bootstrap::BootstrapDefaults {
                server_uri: b.server_uri.clone(),
                server_uri_plain: b.server_uri_plain.clone(),
                short_server_id: b.short_server_id,
                lifetime_s: b.lifetime_s,
                binding: b.binding.clone(),
                generate_psk: b.generate_psk,
            },
            discover: b.discover,
            delete_root: b.delete_root,
            session_timeout: Duration::from_secs(b.session_timeout_s.max(1)),
            max_sessions: b.max_sessions_per_shard.max(1),
            allow_plain_secrets: b.allow_plain_secrets,
            block_szx: self.coap.block_szx.min(6),
            busy_max_age_s: self.coap.busy_max_age_s,
            seed,
            key_seed,
        }
    }

    /// Checks `[firmware]`: the Package URI bases name their scheme and a
    /// host (a device is written `{base}/fw/{name}`).
    pub fn check_firmware(&self) -> Result<(), String> {
        for (key, uri, scheme) in [
            ("coap_uri", &self.firmware.coap_uri, "coap://"),
            ("coaps_uri", &self.firmware.coaps_uri, "coaps://"),
        ] {
            if let Some(u) = uri {
                let host = u.strip_prefix(scheme).unwrap_or("");
                if host.is_empty() || host.contains(['/', '?', '#', ' ']) || u.len() > 200 {
                    return Err(format!(
                        "firmware.{key} {u:?}: {scheme}host[:port], nothing after (the gateway appends /fw/{{name}})"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks `[admin]`: its token loads, and an API reachable beyond
    /// loopback has one (the gateway refuses to start otherwise).
    pub fn check_admin(&self) -> Result<(), String> {
        let token = self.admin.token()?;
        if token.is_none() && !self.admin.listen.ip().is_loopback() {
            return Err(format!(
                "admin.listen {} is beyond loopback and no admin token is configured: set admin.token_file or admin.token_env, or listen on 127.0.0.1",
                self.admin.listen
            ));
        }
        Ok(())
    }

    /// Checks `[bootstrap]` (URIs, the defaults' account).
    pub fn check_bootstrap(&self) -> Result<(), String> {
        let b = &self.bootstrap;
        if !b.enabled {
            return Ok(());
        }
        let dtls = b.dtls && self.dtls.enabled;
        if !(b.plain || dtls) {
            return Err("bootstrap.enabled but neither bootstrap.plain nor bootstrap.dtls (with dtls.enabled)".into());
        }
        for (uri, secure) in [(&b.server_uri, true), (&b.server_uri_plain, false)] {
            if let Some(u) = uri {
                use crate::proto::lwm2m::bootstrap::{SecurityMode, ServerAccount};
                let acc = ServerAccount {
                    lifetime_s: Some(b.lifetime_s),
                    binding: Some(b.binding.clone()),
                    security: Some(if secure {
                        SecurityMode::Psk
                    } else {
                        SecurityMode::NoSec
                    }),
                    ..ServerAccount::new(u, b.short_server_id)
                };
                acc.validate().map_err(|e| format!("bootstrap: {e}"))?;
            }
        }
        Ok(())
    }

    /// The LwM2M server configuration of shard `shard`.
    pub fn server_config(&self, shard: usize, seed: u64) -> ServerConfig {
        let c = &self.coap;
        ServerConfig {
            shard: shard as u16,
            shards: self.shard_count() as u16,
            exchange: ExchangeConfig {
                ack_timeout: Duration::from_millis(c.ack_timeout_ms),
                ack_random_factor: c.ack_random_factor,
                max_retransmit: c.max_retransmit,
                exchange_lifetime: Duration::from_secs(c.exchange_lifetime_s),
                nstart: c.nstart.max(1),
                dedup_max_peers: c.dedup_max_peers.max(1),
            },
            busy_max_age_s: c.busy_max_age_s,
            lifetime_grace_s: c.lifetime_grace_s,
            min_lifetime_s: c.min_lifetime_s,
            max_datagram: self.gateway.max_datagram,
            ack_policy: self.kafka.ack_after,
            seed,
            queue_awake: Duration::from_secs(c.queue_awake_s),
            block_szx: c.block_szx.min(6),
            max_body: c.max_body.max(1024),
            max_block1_assemblies: c.max_block1_assemblies.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An admin API beyond loopback needs a token; on loopback it may be
    /// open.
    #[test]
    fn admin_beyond_loopback_needs_a_token() {
        let mut c = Config::default();
        c.check_admin().unwrap();
        c.admin.listen = "0.0.0.0:8080".parse().unwrap();
        let e = c.check_admin().unwrap_err();
        assert!(e.contains("beyond loopback"), "{e}");
        c.admin.listen = "[::1]:8080".parse().unwrap();
        c.check_admin().unwrap();
        let dir = std::env::temp_dir().join(format!("corem-admin-token-{}", std::process::id()));
        std::fs::write(&dir, "0123456789abcdef0123\n").unwrap();
        c.admin.listen = "192.0.2.1:8080".parse().unwrap();
        c.admin.token_file = Some(dir.clone());
        c.check_admin().unwrap();
        std::fs::write(&dir, "short").unwrap();
        assert!(c.check_admin().unwrap_err().contains("16 characters"));
        let _ = std::fs::remove_file(&dir);
    }

    /// The shipped sample configurations parse (every key is known) and
    /// resolve their relative paths next to themselves.
    #[test]
    fn shipped_configs_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in ["config/gateway.toml", "config/demo.toml"] {
            let c = Config::load(&root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(
                c.directory.snapshot_dir.starts_with(root.join("config")),
                "{f}"
            );
            assert_eq!(c.firmware_dir(), c.directory.snapshot_dir.join("firmware"));
            c.check_firmware().unwrap();
            c.check_admin().unwrap();
        }
        let demo = Config::load(&root.join("config/demo.toml")).unwrap();
        assert!(demo.bootstrap.enabled && demo.bootstrap.generate_psk);
        assert_eq!(demo.firmware.max_image_bytes, 64 << 20);
        let mut c = demo.clone();
        c.firmware.coaps_uri = Some("coaps://gw.example.net:5684".into());
        c.check_firmware().unwrap();
        for bad in ["https://gw", "coaps://", "coaps://gw/fw", "coap://gw:5683"] {
            c.firmware.coaps_uri = Some(bad.into());
            assert!(c.check_firmware().is_err(), "{bad}");
        }
    }
}
