//! Admin HTTP server: the control-plane API (provisioning, profiles, RPCs,
//! devices) and the operator's `/healthz` and `/metrics`.
//!
//! It runs on its own small tokio runtime (one thread, off the shard
//! cores) with hyper's HTTP/1.1 server, and holds up against slow or
//! hostile clients:
//!
//! * a request's headers must arrive within `admin.header_timeout_ms`
//!   (hyper's header read timeout; a trickling client is dropped), its body
//!   within `admin.body_timeout_ms` (408 after), and a connection that
//!   moves no byte for `admin.idle_timeout_ms` is closed (a client that
//!   stops reading its response, an idle keep-alive);
//! * at most `admin.max_connections` connections are open (more are closed
//!   at once, counted), at most `admin.max_concurrent` requests are handled
//!   at once (the rest wait, then 503);
//! * bodies are limited (413 from `Content-Length`, or once the limit is
//!   read): `admin.max_body_bytes` for bulk provisioning, 1 MiB elsewhere;
//! * with a token configured, every call but `GET /healthz` and `GET
//!   /metrics` needs `Authorization: Bearer <token>` (401 otherwise,
//!   compared in constant time), checked before the body is read.
//!
//! `/healthz` and `/metrics` are answered on the runtime thread itself;
//! every other call runs on a blocking thread (they wait for fsyncs, the
//! RPC service or a shard), so a slow call never stalls the health check.
//! Routes and their JSON live in [`routes`]; every error is JSON
//! `{"code": "...", "message": "..."}`.

pub mod routes;

pub use routes::{AdminState, EndpointsHook, ProfilesHook, TenantHook};

use crate::config::AdminConfig;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use routes::{ApiRequest, Reply};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;

/// Body limit of every call but bulk provisioning.
pub const SMALL_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin listen {0}: {1}")]
    Listen(SocketAddr, String),
    #[error("admin token: {0}")]
    Token(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Counters of what the server refused (also on `/metrics`).
#[derive(Default)]
pub struct AdminCounters {
    pub requests: AtomicU64,
    pub unauthorized: AtomicU64,
    pub connections_refused: AtomicU64,
    pub body_timeouts: AtomicU64,
    pub too_large: AtomicU64,
    pub busy: AtomicU64,
    pub idle_closed: AtomicU64,
}

struct Shared {
    state: AdminState,
    token: Option<String>,
    header_timeout: Duration,
    body_timeout: Duration,
    idle_timeout: Duration,
    max_body: usize,
    work: Arc<Semaphore>,
    /// Telemetry long-polls in progress (they wait; other calls must not
    /// wait behind them).
    polls: Arc<Semaphore>,
    counters: Arc<AdminCounters>,
    /// Turns true at stop: connections finish their request in progress
    /// and close (hyper's graceful shutdown).
    stopping: tokio::sync::watch::Sender<bool>,
}

/// How long a stop waits for requests in progress to be answered.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Telemetry long-polls at once (`GET /v1/devices/{id}/telemetry`).
const MAX_POLLS: usize = 8;

pub struct AdminServer {
    pub addr: SocketAddr,
    pub counters: Arc<AdminCounters>,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Closed at stop, so telemetry long polls answer at once.
    tap: Option<Arc<crate::sink::tap::Tap>>,
}

impl AdminServer {
    pub fn start(cfg: &AdminConfig, mut state: AdminState) -> Result<AdminServer, AdminError> {
        let token = cfg.token().map_err(AdminError::Token)?;
        if token.is_none() && !cfg.listen.ip().is_loopback() {
            // The API provisions devices, sends RPCs and uploads firmware:
            // beyond loopback it is never open.
            return Err(AdminError::Token(format!(
                "admin.listen {} is beyond loopback and no admin token is configured: set admin.token_file or admin.token_env, or listen on 127.0.0.1",
                cfg.listen
            )));
        }
        let listener = std::net::TcpListener::bind(cfg.listen)
            .map_err(|e| AdminError::Listen(cfg.listen, e.to_string()))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(AdminCounters::default());
        state.counters = Some(counters.clone());
        let tap = state.tap.clone();
        let shared = Arc::new(Shared {
            state,
            token,
            header_timeout: Duration::from_millis(cfg.header_timeout_ms.max(100)),
            body_timeout: Duration::from_millis(cfg.body_timeout_ms.max(100)),
            idle_timeout: Duration::from_millis(cfg.idle_timeout_ms.max(1000)),
            max_body: cfg.max_body_bytes.max(SMALL_BODY),
            work: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
            polls: Arc::new(Semaphore::new(MAX_POLLS)),
            counters: counters.clone(),
            stopping: tokio::sync::watch::Sender::new(false),
        });
        let max_connections = cfg.max_connections.max(1);
        let blocking = cfg.max_concurrent.max(1) + MAX_POLLS + 2;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(blocking)
            .thread_name("admin-http")
            .build()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("admin-http".into())
            .spawn(move || {
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => serve(l, shared, max_connections, rx).await,
                        Err(e) => tracing::error!(error = %e, "admin listener unusable"),
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })?;
        Ok(AdminServer {
            addr,
            counters,
            thread: Some(thread),
            stop: Some(tx),
            tap,
        })
    }

    pub fn stop(mut self) {
        if let Some(t) = &self.tap {
            t.close();
        }
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    sh: Arc<Shared>,
    max_connections: usize,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let conns = Arc::new(Semaphore::new(max_connections));
    let mut refused_logged = Instant::now() - Duration::from_secs(60);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            a = listener.accept() => a,
        };
        let (stream, _peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            sh.counters
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            if refused_logged.elapsed() > Duration::from_secs(10) {
                refused_logged = Instant::now();
                tracing::warn!(
                    max = max_connections,
                    "admin connections at their limit: new ones are closed (admin.max_connections)"
                );
            }
            drop(stream);
            continue;
        };
        let sh = sh.clone();
        tokio::spawn(async move {
            connection(stream, sh).await;
            drop(permit);
        });
    }
    // Stop: no new connections; the open ones answer the request they are
    // in (a telemetry long poll answers at once: the tap is closed) and
    // close, for up to STOP_GRACE; the runtime drops what is left.
    drop(listener);
    sh.stopping.send_replace(true);
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(STOP_GRACE, conns.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = STOP_GRACE.as_millis() as u64,
            "admin connections still busy at stop: closed"
        );
    }
}

/// One connection: HTTP/1.1 with keep-alive, under the header timeout and
/// the idle watchdog.
async fn connection(stream: tokio::net::TcpStream, sh: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let base = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Tracked {
        inner: stream,
        base,
        last: last.clone(),
    });
    let svc_sh = sh.clone();
    let svc = service_fn(move |req| handle(svc_sh.clone(), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(sh.header_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true)
        .serve_connection(io, svc);
    let idle = sh.idle_timeout;
    let mut stopping = sh.stopping.subscribe();
    tokio::pin!(conn);
    let watchdog = async {
        loop {
            tokio::time::sleep(idle / 4).await;
            let quiet = base
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
        }
    };
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "admin connection ended");
            }
        }
        _ = watchdog => {
            sh.counters.idle_closed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("admin connection closed: idle");
        }
        _ = async { stopping.wait_for(|s| *s).await.is_ok() } => {
            // The request in progress is answered, then the connection
            // closes (an idle keep-alive connection closes at once).
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn respond(r: Reply) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(r.status)
        .header("content-type", r.content_type);
    if r.status == 401 {
        b = b.header("www-authenticate", "Bearer");
    }
    b.body(Full::new(r.body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

async fn handle(
    sh: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    sh.counters.requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    // Never behind the token, never on a blocking thread.
    if method == "GET" && path == "/healthz" {
        return Ok(respond(routes::healthz(&sh.state)));
    }
    if method == "GET" && path == "/metrics" {
        return Ok(respond(routes::metrics(&sh.state)));
    }
    // The console's static files carry no data: served without the token
    // (the page asks for it and sends it with every API call).
    if method == "GET" {
        if let Some(r) = routes::console(&path) {
            return Ok(respond(r));
        }
    }
    if let Some(token) = &sh.token {
        if !authorized(&req, token) {
            sh.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            return Ok(respond(Reply::error(
                401,
                "unauthorized",
                "a valid bearer token is required (Authorization: Bearer <token>)",
            )));
        }
    }
    if method == "PUT" && path.starts_with("/v1/firmware/") {
        let name = routes::pct_decode(&path["/v1/firmware/".len()..], false);
        return Ok(respond(upload_firmware(&sh, name, &query, req).await));
    }
    let limit = if method == "POST" && (path == "/v1/endpoints" || path == "/v1/firmware/campaigns")
    {
        sh.max_body
    } else {
        SMALL_BODY
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        sh.counters.too_large.fetch_add(1, Ordering::Relaxed);
        return Ok(respond(too_large(limit)));
    }
    let deadline = tokio::time::Instant::now() + sh.body_timeout;
    let body =
        match tokio::time::timeout_at(deadline, Limited::new(req.into_body(), limit).collect())
            .await
        {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) => {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    sh.counters.too_large.fetch_add(1, Ordering::Relaxed);
                    return Ok(respond(too_large(limit)));
                }
                return Ok(respond(Reply::error(
                    400,
                    "bad_request",
                    &format!("reading the body: {e}"),
                )));
            }
            Err(_) => {
                sh.counters.body_timeouts.fetch_add(1, Ordering::Relaxed);
                return Ok(respond(Reply::error(
                    408,
                    "request_timeout",
                    "the request body did not arrive in time",
                )));
            }
        };
    let long_poll =
        method == "GET" && path.starts_with("/v1/devices/") && path.ends_with("/telemetry");
    let pool = if long_poll { &sh.polls } else { &sh.work };
    let Ok(permit) = tokio::time::timeout_at(deadline, pool.clone().acquire_owned()).await else {
        sh.counters.busy.fetch_add(1, Ordering::Relaxed);
        return Ok(respond(Reply::error(
            503,
            "busy",
            "too many admin requests at once; retry",
        )));
    };
    let Ok(permit) = permit else {
        return Ok(respond(Reply::error(503, "unavailable", "shutting down")));
    };
    let sh2 = sh.clone();
    let r = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let req = ApiRequest {
            method,
            path,
            query,
            body,
        };
        routes::route(&sh2.state, &req)
    })
    .await
    .unwrap_or_else(|e| {
        tracing::error!(error = %e, "admin handler failed");
        Reply::error(500, "internal", "the handler failed")
    });
    Ok(respond(r))
}

/// What the body reader hands the image writer.
enum Piece {
    Chunk(Bytes),
    /// The whole body arrived: install it.
    End,
}

/// `PUT /v1/firmware/{name}?version=…&sha256=…`: the body streams into the
/// store (hashed as it arrives, never held whole in memory) on a blocking
/// thread; it is installed only once all of it arrived and, when `sha256`
/// was given, matched. A body that stops, breaks or times out
/// (`firmware.upload_timeout_s`) leaves nothing behind.
async fn upload_firmware(
    sh: &Arc<Shared>,
    name: String,
    query: &str,
    req: Request<Incoming>,
) -> Reply {
    let Some(store) = sh.state.firmware.clone() else {
        return Reply::unavailable("no firmware store");
    };
    let version = routes::query_param(query, "version").unwrap_or_default();
    let sha256 = routes::query_param(query, "sha256").filter(|s| !s.is_empty());
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > store.max_bytes()) {
        sh.counters.too_large.fetch_add(1, Ordering::Relaxed);
        return routes::firmware_error(&crate::control::firmware::FirmwareError::TooLarge(
            store.max_bytes(),
        ));
    }
    let deadline = tokio::time::Instant::now() + sh.state.firmware_upload_timeout;
    let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, sh.work.clone().acquire_owned()).await
    else {
        sh.counters.busy.fetch_add(1, Ordering::Relaxed);
        return Reply::error(503, "busy", "too many admin requests at once; retry");
    };
    let existed = store.meta(&name).is_some();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(8);
    let writer = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut up = store.begin(&name, &version, sha256.as_deref())?;
        while let Some(p) = rx.blocking_recv() {
            match p {
                Piece::Chunk(c) => up.write(&c)?,
                Piece::End => return up.finish().map(Some),
            }
        }
        // The reader gave up: dropping the upload removes its file.
        Ok(None)
    });
    let mut body = req.into_body();
    let mut failure: Option<Reply> = None;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if tx.send(Piece::Chunk(data)).await.is_err() {
                        break; // the writer refused (its error is the answer)
                    }
                }
            }
            Ok(None) => {
                let _ = tx.send(Piece::End).await;
                break;
            }
            Ok(Some(Err(e))) => {
                failure = Some(Reply::error(
                    400,
                    "bad_request",
                    &format!("reading the body: {e}"),
                ));
                break;
            }
            Err(_) => {
                sh.counters.body_timeouts.fetch_add(1, Ordering::Relaxed);
                failure = Some(Reply::error(
                    408,
                    "request_timeout",
                    "the image did not arrive within firmware.upload_timeout_s",
                ));
                break;
            }
        }
    }
    drop(tx);
    let result = writer.await;
    match (result, failure) {
        (Ok(Err(e)), _) => {
            if matches!(e, crate::control::firmware::FirmwareError::TooLarge(_)) {
                sh.counters.too_large.fetch_add(1, Ordering::Relaxed);
            }
            routes::firmware_error(&e)
        }
        (_, Some(f)) => f,
        (Ok(Ok(Some(meta))), None) => {
            tracing::info!(image = %meta.name, version = %meta.version, size = meta.size, sha256 = %meta.sha256, "firmware image stored (admin API)");
            Reply::json(if existed { 200 } else { 201 }, &meta)
        }
        (Ok(Ok(None)), None) => Reply::error(400, "bad_request", "the body ended early"),
        (Err(e), None) => {
            tracing::error!(error = %e, "firmware upload writer failed");
            Reply::error(500, "internal", "the upload failed")
        }
    }
}

fn too_large(limit: usize) -> Reply {
    Reply::error(
        413,
        "payload_too_large",
        &format!("the request body exceeds {limit} bytes"),
    )
}

/// `Authorization: Bearer <token>`, compared in constant time.
fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(v) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(given) = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
    else {
        return false;
    };
    let given = given.trim().as_bytes();
    given.len() == token.len() && openssl::memcmp::eq(given, token.as_bytes())
}

/// A socket that records when it last moved a byte (the idle watchdog).
struct Tracked {
    inner: tokio::net::TcpStream,
    base: Instant,
    last: Arc<AtomicU64>,
}

impl Tracked {
    fn touch(&self) {
        self.last
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
