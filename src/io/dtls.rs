//! The DTLS handshake on OpenSSL, as an [`Acceptor`] for the shard's
//! sans-IO [`crate::proto::dtls::DtlsEndpoint`].
//!
//! No socket and no thread per session: each handshake is an `SslStream`
//! over an in-memory datagram pipe (a read returns one queued datagram, a
//! write is one datagram), fed by the shard from its own socket. The
//! verified second ClientHello enters through `DTLSv1_listen`, which sets
//! the handshake message and record sequence numbers the client expects
//! (RFC 6347 §4.2.1: the transcript starts at that hello; the
//! HelloVerifyRequest was already sent, statelessly, by the endpoint).
//! Flights are retransmitted by OpenSSL's timer (`DTLSv1_get_timeout` /
//! `DTLSv1_handle_timeout`, RFC 6347 §4.2.4: initial 1 s, doubling), driven
//! by the endpoint's timers. When the handshake completes, the master
//! secret, the randoms and the negotiated suite become the session's
//! [`Keys`] and the OpenSSL object is freed.
//!
//! Identity (RFC 7252 §9.1.3): the PSK identity the client used (its key
//! looked up in the directory, RFC 4279 §5.1), or the verified client
//! certificate's subject CN, SANs and SHA-256 fingerprint. Certificates
//! must chain to the configured CA bundle, or be pinned by fingerprint in
//! the directory (self-signed device certificates).

use crate::proto::dtls::cipher::{Keys, Suite};
use crate::proto::dtls::endpoint::{
    credential_tag, Acceptor, Established, Handshake, HandshakeStatus,
};
use crate::proto::lwm2m::endpoint::Identity;
use foreign_types::ForeignTypeRef;
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions, SslStream,
    SslVerifyMode, SslVersion,
};
use openssl::x509::X509Ref;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where the handshake finds credentials (the endpoint directory).
pub trait Credentials: Send + Sync {
    /// The PSK key for a PSK identity.
    fn psk_key(&self, identity: &[u8]) -> Option<Vec<u8>>;
    /// True when a certificate with this SHA-256 fingerprint is pinned.
    fn pinned(&self, sha256: &[u8; 32]) -> bool;
}

/// Server-side TLS settings (the `[dtls]` section's files and suites).
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// PEM certificate chain of the gateway (ECDSA P-256 for the
    /// ECDHE_ECDSA suites).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// CA bundle client certificates must chain to.
    pub ca_file: Option<PathBuf>,
    /// OpenSSL cipher string; `None`: [`DEFAULT_CIPHERS`].
    pub ciphers: Option<String>,
    /// Handshake datagram size (flights are fragmented to fit).
    pub mtu: u32,
}

/// LwM2M TS 1.1 Transport §5.2.8 / §5.2.9 make TLS_PSK_WITH_AES_128_CCM_8
/// and TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 mandatory; the CBC and GCM suites
/// follow for clients without CCM. Every suite has to be named: OpenSSL's
/// default list has no CCM-8 (tinydtls offers nothing else).
pub const DEFAULT_CIPHERS: &str = "PSK-AES128-CCM8:ECDHE-ECDSA-AES128-CCM8:PSK-AES128-CCM:ECDHE-ECDSA-AES128-CCM:ECDHE-ECDSA-AES128-GCM-SHA256:PSK-AES128-GCM-SHA256:PSK-AES128-CBC-SHA256:ECDHE-ECDSA-AES128-SHA256";

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("DTLS {what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: ErrorStack,
    },
    #[error("DTLS cipher list {0:?} enables none of the supported suites")]
    Ciphers(String),
    #[error("DTLS context: {0}")]
    Openssl(#[from] ErrorStack),
}

/// Builds the shard's server context. `creds` answers the PSK and pinning
/// callbacks.
pub fn server_context(
    s: &TlsSettings,
    creds: Arc<dyn Credentials>,
) -> Result<SslContext, TlsSetupError> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_options(
        SslOptions::NO_TICKET
            | SslOptions::NO_QUERY_MTU
            | SslOptions::NO_RENEGOTIATION
            | SslOptions::CIPHER_SERVER_PREFERENCE,
    );
    let ciphers = s
        .ciphers
        .clone()
        .unwrap_or_else(|| DEFAULT_CIPHERS.to_string());
    // OpenSSL 3.2 moved the CCM-8 suites to security level 0 (their 64-bit
    // tag); LwM2M requires them (tinydtls offers nothing else). Level 0 is
    // used only when the list names a CCM-8 suite: the suites stay exactly
    // the listed ones, certificates are still verified against the CA.
    b.set_security_level(if ciphers.contains("CCM8") { 0 } else { 1 });
    b.set_cipher_list(&ciphers)
        .map_err(|_| TlsSetupError::Ciphers(ciphers.clone()))?;
    if let (Some(c), Some(k)) = (&s.cert_file, &s.key_file) {
        b.set_certificate_chain_file(c)
            .map_err(|e| TlsSetupError::File {
                what: "certificate",
                path: c.clone(),
                source: e,
            })?;
        b.set_private_key_file(k, SslFiletype::PEM)
            .map_err(|e| TlsSetupError::File {
                what: "private key",
                path: k.clone(),
                source: e,
            })?;
        b.check_private_key()?;
    }
    if let Some(ca) = &s.ca_file {
        b.set_ca_file(ca).map_err(|e| TlsSetupError::File {
            what: "CA bundle",
            path: ca.clone(),
            source: e,
        })?;
    }
    let pin = creds.clone();
    // Certificate suites need a client certificate (LwM2M X.509 mode is
    // mutual); PSK suites never request one.
    b.set_verify_callback(
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        move |ok, x| {
            if ok {
                return true;
            }
            // A self-signed device certificate pinned in the directory.
            if x.error_depth() != 0 {
                return false;
            }
            let Some(cert) = x.current_cert() else {
                return false;
            };
            fingerprint(cert).is_some_and(|f| pin.pinned(&f))
        },
    );
    let psk = creds;
    b.set_psk_server_callback(move |_ssl, identity, out| {
        let key = identity.and_then(|id| psk.psk_key(id));
        match key {
            Some(k) if k.len() <= out.len() => {
                out[..k.len()].copy_from_slice(&k);
                Ok(k.len())
            }
            // 0: unknown identity; OpenSSL answers with an
            // unknown_psk_identity / decrypt_error alert.
            _ => Ok(0),
        }
    });
    // DTLSv1_listen insists on both callbacks; the endpoint checked the
    // cookie before any SSL object exists.
    b.set_cookie_generate_cb(|_, out| {
        out[0] = 0;
        Ok(1)
    });
    b.set_cookie_verify_cb(|_, _| true);
    Ok(b.build())
}

fn fingerprint(cert: &X509Ref) -> Option<[u8; 32]> {
    let d = cert.digest(MessageDigest::sha256()).ok()?;
    <[u8; 32]>::try_from(&d[..]).ok()
}

/// The in-memory datagram pipe under one handshake.
#[derive(Default)]
struct Pipe {
    inbox: VecDeque<Vec<u8>>,
    outbox: VecDeque<Vec<u8>>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inbox.pop_front() {
            Some(d) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbox.push_back(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

extern "C" {
    // RFC 6347 §4.2.1 on OpenSSL's side (ssl/d1_lib.c); not bound by
    // openssl-sys.
    fn DTLSv1_listen(s: *mut openssl_sys::SSL, client: *mut std::ffi::c_void) -> std::ffi::c_int;
    fn BIO_ADDR_new() -> *mut std::ffi::c_void;
    fn BIO_ADDR_free(a: *mut std::ffi::c_void);
}

const DTLS_CTRL_GET_TIMEOUT: std::ffi::c_int = 73;
const DTLS_CTRL_HANDLE_TIMEOUT: std::ffi::c_int = 74;

pub struct OpensslAcceptor {
    ctx: SslContext,
    mtu: u32,
    creds: Arc<dyn Credentials>,
}

impl OpensslAcceptor {
    /// `creds` must be the ones `ctx` was built with.
    pub fn new(ctx: SslContext, mtu: u32, creds: Arc<dyn Credentials>) -> OpensslAcceptor {
        OpensslAcceptor {
            ctx,
            mtu: if mtu == 0 { 1200 } else { mtu },
            creds,
        }
    }
}

pub struct OpensslHandshake {
    stream: SslStream<Pipe>,
    status: Option<Result<(), String>>,
    creds: Arc<dyn Credentials>,
}

impl Acceptor for OpensslAcceptor {
    type H = OpensslHandshake;

    fn accept(&mut self, _peer: SocketAddr, hello: &[u8]) -> Result<OpensslHandshake, String> {
        let mut ssl = Ssl::new(&self.ctx).map_err(|e| e.to_string())?;
        ssl.set_accept_state();
        ssl.set_mtu(self.mtu).map_err(|e| e.to_string())?;
        let mut pipe = Pipe::default();
        pipe.inbox.push_back(hello.to_vec());
        let stream = SslStream::new(ssl, pipe).map_err(|e| e.to_string())?;
        // SAFETY: the SSL object is alive (owned by `stream`) and has its
        // BIOs; BIO_ADDR is allocated and freed here.
        let r = unsafe {
            let addr = BIO_ADDR_new();
            let r = DTLSv1_listen(stream.ssl().as_ptr(), addr);
            BIO_ADDR_free(addr);
            r
        };
        if r != 1 {
            return Err(format!("DTLSv1_listen refused the ClientHello ({r})"));
        }
        let mut h = OpensslHandshake {
            stream,
            status: None,
            creds: self.creds.clone(),
        };
        h.step();
        Ok(h)
    }
}

impl OpensslHandshake {
    fn step(&mut self) {
        if self.status.is_some() {
            return;
        }
        match self.stream.do_handshake() {
            Ok(()) => self.status = Some(Ok(())),
            Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {}
            Err(e) => {
                let why = match e.ssl_error() {
                    Some(s) => s.to_string(),
                    None => e.to_string(),
                };
                self.status = Some(Err(why));
            }
        }
    }

    fn established(&mut self) -> Result<Established, String> {
        let ssl = self.stream.ssl();
        let name = ssl.current_cipher().map(|c| c.name()).unwrap_or("");
        let suite =
            Suite::from_openssl_name(name).ok_or_else(|| format!("unsupported suite {name}"))?;
        let session = ssl.session().ok_or("no session")?;
        let mut master = [0u8; 48];
        let n = session.master_key(&mut master);
        let mut cr = [0u8; 32];
        let mut sr = [0u8; 32];
        ssl.client_random(&mut cr);
        ssl.server_random(&mut sr);
        let keys = Keys::derive(suite, &master[..n], &cr, &sr);
        master.fill(0);
        let (identity, cred_tag) = if suite.is_psk() {
            let id = ssl.psk_identity().ok_or("no PSK identity")?.to_vec();
            let tag = self
                .creds
                .psk_key(&id)
                .map(|k| credential_tag(&k))
                .unwrap_or(0);
            (Identity::Psk(id), tag)
        } else {
            let cert = ssl.peer_certificate().ok_or("no client certificate")?;
            (
                identity_of(&cert).ok_or("unreadable client certificate")?,
                0,
            )
        };
        Ok(Established {
            keys,
            identity,
            cred_tag,
        })
    }
}

/// The identity a verified certificate establishes.
pub fn identity_of(cert: &X509Ref) -> Option<Identity> {
    let subject_cn = cert
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
        .unwrap_or_default();
    let sans = cert
        .subject_alt_names()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.dnsname().or_else(|| n.uri()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Some(Identity::X509 {
        subject_cn,
        sans,
        sha256: fingerprint(cert)?,
    })
}

impl Handshake for OpensslHandshake {
    fn handle_datagram(&mut self, datagram: &[u8]) {
        // OpenSSL reads what it is given at once; a peer cannot queue more
        // than a flight's worth here.
        if self.stream.get_mut().inbox.len() < 16 {
            self.stream.get_mut().inbox.push_back(datagram.to_vec());
        }
        self.step();
    }

    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.stream.get_mut().outbox.pop_front()
    }

    fn timeout(&mut self) -> Option<Duration> {
        if self.status.is_some() {
            return None;
        }
        let mut tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        };
        // SAFETY: DTLS_CTRL_GET_TIMEOUT writes one struct timeval.
        let r = unsafe {
            openssl_sys::SSL_ctrl(
                self.stream.ssl().as_ptr(),
                DTLS_CTRL_GET_TIMEOUT,
                0,
                (&mut tv as *mut libc::timeval).cast(),
            )
        };
        (r == 1).then(|| Duration::new(tv.tv_sec.max(0) as u64, (tv.tv_usec.max(0) as u32) * 1000))
    }

    fn handle_timeout(&mut self) {
        // SAFETY: plain control call on a live SSL object.
        unsafe {
            openssl_sys::SSL_ctrl(
                self.stream.ssl().as_ptr(),
                DTLS_CTRL_HANDLE_TIMEOUT,
                0,
                std::ptr::null_mut(),
            );
        }
        self.step();
    }

    fn status(&mut self) -> HandshakeStatus {
        match self.status.take() {
            None => HandshakeStatus::InProgress,
            Some(Err(why)) => {
                self.status = Some(Err(why.clone()));
                HandshakeStatus::Failed(why)
            }
            Some(Ok(())) => match self.established() {
                Ok(e) => HandshakeStatus::Done(Box::new(e)),
                Err(why) => {
                    self.status = Some(Err(why.clone()));
                    HandshakeStatus::Failed(why)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ShardMetrics;
    use crate::proto::dtls::endpoint::{DtlsConfig, DtlsEndpoint};
    use crate::proto::lwm2m::server::Now;
    use crate::testkit::certs::{self, Pki};
    use crate::testkit::dtls_client::{client_context, ClientAuth, DtlsClient, Memory};
    use std::time::Instant;

    struct Creds {
        psk: Vec<(Vec<u8>, Vec<u8>)>,
        pins: Vec<[u8; 32]>,
    }

    impl Credentials for Creds {
        fn psk_key(&self, identity: &[u8]) -> Option<Vec<u8>> {
            self.psk
                .iter()
                .find(|(i, _)| i == identity)
                .map(|(_, k)| k.clone())
        }
        fn pinned(&self, sha256: &[u8; 32]) -> bool {
            self.pins.contains(sha256)
        }
    }

    struct World {
        ep: DtlsEndpoint<OpensslAcceptor>,
        metrics: Arc<ShardMetrics>,
        t0: Instant,
        ms: u64,
        pki: Pki,
        _dir: tempfile::TempDir,
    }

    fn world(pins: Vec<[u8; 32]>) -> World {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("test CA");
        let (c, k) = pki.issue("gateway", &["localhost"]);
        let (cert_file, key_file) = certs::write_pem(dir.path(), "gw", &c, &k);
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, pki.cert.to_pem().unwrap()).unwrap();
        let settings = TlsSettings {
            cert_file: Some(cert_file),
            key_file: Some(key_file),
            ca_file: Some(ca_file),
            ciphers: None,
            mtu: 1200,
        };
        let creds = Arc::new(Creds {
            psk: vec![(b"dev-1".to_vec(), vec![0x11; 16])],
            pins,
        });
        let ctx = server_context(&settings, creds.clone()).unwrap();
        let metrics = Arc::new(ShardMetrics::default());
        let t0 = Instant::now();
        let ep = DtlsEndpoint::new(
            t0,
            DtlsConfig::default(),
            OpensslAcceptor::new(ctx, 1200, creds),
            [3; 32],
            metrics.clone(),
        )
        .unwrap();
        World {
            ep,
            metrics,
            t0,
            ms: 0,
            pki,
            _dir: dir,
        }
    }

    impl World {
        fn now(&mut self) -> Now {
            self.ms += 1;
            Now {
                instant: self.t0 + Duration::from_millis(self.ms),
                wall_ms: self.ms as i64,
            }
        }

        /// Moves datagrams both ways until neither side has any; returns
        /// the application data the endpoint decrypted.
        fn pump(&mut self, c: &mut DtlsClient<Memory>, peer: SocketAddr) -> Vec<Vec<u8>> {
            let mut got = Vec::new();
            for _ in 0..50 {
                let _ = c.handshake_step();
                let out: Vec<Vec<u8>> = c.transport().outbox.drain(..).collect();
                let now = self.now();
                for mut d in out.clone() {
                    self.ep
                        .handle_datagram(now, peer, &mut d, |_, pt| got.push(pt.to_vec()));
                }
                let back: Vec<Vec<u8>> = self.ep.transmits().map(|(_, d)| d.to_vec()).collect();
                self.ep.clear_transmits();
                if out.is_empty() && back.is_empty() {
                    break;
                }
                c.transport().inbox.extend(back);
            }
            got
        }
    }

    fn exchange(
        w: &mut World,
        auth: &ClientAuth,
        cipher: &str,
        peer: SocketAddr,
    ) -> Result<DtlsClient<Memory>, String> {
        let ctx = client_context(auth, cipher).unwrap();
        let mut c = DtlsClient::new(&ctx, Memory::default()).unwrap();
        w.pump(&mut c, peer);
        if !c.connected || w.ep.session(&peer).is_none() {
            return Err(format!(
                "no session (client connected: {}, handshakes failed: {})",
                c.connected,
                ShardMetrics::get(&w.metrics.dtls_handshakes_failed)
            ));
        }
        assert_eq!(
            c.ssl().current_cipher().unwrap().name(),
            cipher,
            "negotiated suite"
        );
        Ok(c)
    }

    /// Records written by OpenSSL's record layer open in ours, and ours
    /// open in OpenSSL's, for every suite, after a real handshake.
    fn records_both_ways(w: &mut World, c: &mut DtlsClient<Memory>, peer: SocketAddr) {
        for msg in [&b"\x40\x01\x00\x01"[..], &[0x55; 1000][..]] {
            c.send(msg).unwrap();
            let got = w.pump(c, peer);
            assert_eq!(
                got,
                vec![msg.to_vec()],
                "{:?}",
                w.metrics
                    .values()
                    .into_iter()
                    .filter(|(n, v)| n.starts_with("dtls") && *v != 0)
                    .collect::<Vec<_>>()
            );
            assert!(w.ep.seal(peer, msg));
            let back: Vec<Vec<u8>> = w.ep.transmits().map(|(_, d)| d.to_vec()).collect();
            w.ep.clear_transmits();
            c.transport().inbox.extend(back);
            assert_eq!(c.try_recv().unwrap(), Some(msg.to_vec()));
        }
    }

    #[test]
    fn psk_suites_handshake_and_records_match_openssl() {
        let mut w = world(vec![]);
        let auth = ClientAuth::Psk {
            identity: b"dev-1".to_vec(),
            key: vec![0x11; 16],
        };
        for (i, cipher) in [
            "PSK-AES128-CCM8",
            "PSK-AES128-CCM",
            "PSK-AES128-GCM-SHA256",
            "PSK-AES128-CBC-SHA256",
        ]
        .into_iter()
        .enumerate()
        {
            let peer = SocketAddr::from(([10, 1, 0, 1], 1000 + i as u16));
            let mut c = exchange(&mut w, &auth, cipher, peer).unwrap();
            let s = w.ep.session(&peer).unwrap();
            assert_eq!(s.identity, Identity::Psk(b"dev-1".to_vec()));
            records_both_ways(&mut w, &mut c, peer);
        }
        assert_eq!(w.ep.handshake_count(), 0, "OpenSSL objects freed");
        // A wrong key: the handshake fails, no session.
        let bad = ClientAuth::Psk {
            identity: b"dev-1".to_vec(),
            key: vec![0x22; 16],
        };
        let peer = SocketAddr::from(([10, 1, 0, 2], 1));
        assert!(exchange(&mut w, &bad, "PSK-AES128-CCM8", peer).is_err());
        let unknown = ClientAuth::Psk {
            identity: b"nobody".to_vec(),
            key: vec![0x11; 16],
        };
        let peer = SocketAddr::from(([10, 1, 0, 3], 1));
        assert!(exchange(&mut w, &unknown, "PSK-AES128-CCM8", peer).is_err());
        // The unknown identity is refused with an alert; the wrong key
        // makes the client's Finished undecryptable, which DTLS drops
        // silently (RFC 6347 §4.1.2.7): that handshake ends at its deadline.
        assert_eq!(ShardMetrics::get(&w.metrics.dtls_handshakes_failed), 1);
        w.ep.handle_timeout(Now {
            instant: w.t0 + Duration::from_secs(31),
            wall_ms: 31_000,
        });
        assert_eq!(ShardMetrics::get(&w.metrics.dtls_handshake_timeouts), 1);
        assert_eq!(w.ep.handshake_count(), 0);
    }

    #[test]
    fn certificate_suites_and_pinning() {
        let (pinned_cert, pinned_key) = certs::self_signed("urn:imei:pinned");
        let fp = fingerprint(&pinned_cert).unwrap();
        let mut w = world(vec![fp]);
        let (cert, key) = w.pki.issue("urn:imei:42", &["urn:imei:42"]);
        let auth = ClientAuth::Cert {
            cert,
            key,
            ca: Some(w.pki.cert.clone()),
        };
        for (i, cipher) in ["ECDHE-ECDSA-AES128-CCM8", "ECDHE-ECDSA-AES128-GCM-SHA256"]
            .into_iter()
            .enumerate()
        {
            let peer = SocketAddr::from(([10, 2, 0, 1], 1000 + i as u16));
            let mut c = exchange(&mut w, &auth, cipher, peer).unwrap();
            match &w.ep.session(&peer).unwrap().identity {
                Identity::X509 {
                    subject_cn, sans, ..
                } => {
                    assert_eq!(subject_cn, "urn:imei:42");
                    assert_eq!(sans, &vec!["urn:imei:42".to_string()]);
                }
                other => panic!("{other:?}"),
            }
            records_both_ways(&mut w, &mut c, peer);
        }
        // A certificate from another CA: no session.
        let other = Pki::new("other CA");
        let (oc, ok) = other.issue("urn:imei:42", &[]);
        let foreign = ClientAuth::Cert {
            cert: oc,
            key: ok,
            ca: None,
        };
        let peer = SocketAddr::from(([10, 2, 0, 2], 1));
        assert!(exchange(&mut w, &foreign, "ECDHE-ECDSA-AES128-CCM8", peer).is_err());
        // A self-signed certificate pinned by fingerprint: accepted.
        let pinned = ClientAuth::Cert {
            cert: pinned_cert,
            key: pinned_key,
            ca: None,
        };
        let peer = SocketAddr::from(([10, 2, 0, 3], 1));
        exchange(&mut w, &pinned, "ECDHE-ECDSA-AES128-CCM8", peer).unwrap();
        match &w.ep.session(&peer).unwrap().identity {
            Identity::X509 { sha256, .. } => assert_eq!(sha256, &fp),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lost_server_finished_is_answered_again() {
        let mut w = world(vec![]);
        let auth = ClientAuth::Psk {
            identity: b"dev-1".to_vec(),
            key: vec![0x11; 16],
        };
        let ctx = client_context(&auth, "PSK-AES128-CCM8").unwrap();
        let mut c = DtlsClient::new(&ctx, Memory::default()).unwrap();
        let peer = SocketAddr::from(([10, 3, 0, 1], 1));
        // Run the handshake, but drop the server's final flight once.
        let mut dropped = false;
        for _ in 0..50 {
            let _ = c.handshake_step();
            let out: Vec<Vec<u8>> = c.transport().outbox.drain(..).collect();
            let now = w.now();
            for mut d in out {
                w.ep.handle_datagram(now, peer, &mut d, |_, _| {});
            }
            let back: Vec<Vec<u8>> = w.ep.transmits().map(|(_, d)| d.to_vec()).collect();
            w.ep.clear_transmits();
            if w.ep.session(&peer).is_some() && !dropped && !back.is_empty() {
                dropped = true;
                // The client's timer fires: it retransmits its final flight.
                std::thread::sleep(Duration::from_millis(1100));
                c.handle_timeout();
                continue;
            }
            if c.connected {
                break;
            }
            c.transport().inbox.extend(back);
        }
        assert!(
            dropped && c.connected,
            "{:?}",
            w.metrics
                .values()
                .into_iter()
                .filter(|(n, v)| n.starts_with("dtls") && *v != 0)
                .collect::<Vec<_>>()
        );
        eprintln!(
            "{:?}",
            w.metrics
                .values()
                .into_iter()
                .filter(|(n, v)| n.starts_with("dtls") && *v != 0)
                .collect::<Vec<_>>()
        );
        assert_eq!(ShardMetrics::get(&w.metrics.dtls_final_flight_resent), 1);
        assert_eq!(ShardMetrics::get(&w.metrics.dtls_handshakes_started), 1);
        records_both_ways(&mut w, &mut c, peer);
    }
}
