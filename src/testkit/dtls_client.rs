//! A DTLS 1.2 client on OpenSSL for tests, the device simulator and the
//! load generator: PSK or certificate, over any datagram transport (a
//! connected UDP socket, or an in-memory pipe for sans-IO tests).
//!
//! Blocking or step-wise: [`DtlsClient::handshake_step`] advances the
//! handshake with whatever datagrams arrived, so one thread can run many
//! handshakes (the load generator).

use openssl::error::ErrorStack;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVerifyMode,
    SslVersion,
};
use openssl::x509::X509;
use std::io::{self, Read, Write};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

/// How the client authenticates.
#[derive(Clone)]
pub enum ClientAuth {
    Psk {
        identity: Vec<u8>,
        key: Vec<u8>,
    },
    Cert {
        cert: X509,
        key: PKey<Private>,
        /// CA the gateway's certificate must chain to (None: not checked).
        ca: Option<X509>,
    },
}

/// A client context offering `ciphers` (OpenSSL names).
pub fn client_context(auth: &ClientAuth, ciphers: &str) -> Result<SslContext, ErrorStack> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_options(SslOptions::NO_TICKET | SslOptions::NO_QUERY_MTU);
    b.set_security_level(0);
    b.set_cipher_list(ciphers)?;
    match auth {
        ClientAuth::Psk { identity, key } => {
            let (identity, key) = (identity.clone(), key.clone());
            b.set_psk_client_callback(move |_ssl, _hint, id_out, key_out| {
                if identity.len() + 1 > id_out.len() || key.len() > key_out.len() {
                    return Ok(0);
                }
                id_out[..identity.len()].copy_from_slice(&identity);
                id_out[identity.len()] = 0;
                key_out[..key.len()].copy_from_slice(&key);
                Ok(key.len())
            });
            b.set_verify(SslVerifyMode::NONE);
        }
        ClientAuth::Cert { cert, key, ca } => {
            b.set_certificate(cert)?;
            b.set_private_key(key)?;
            match ca {
                Some(ca) => {
                    b.cert_store_mut().add_cert(ca.clone())?;
                    b.set_verify(SslVerifyMode::PEER);
                }
                None => b.set_verify(SslVerifyMode::NONE),
            }
        }
    }
    Ok(b.build())
}

/// A datagram transport: `recv` returns `WouldBlock` when nothing waits.
pub trait Datagrams {
    fn send(&mut self, d: &[u8]) -> io::Result<()>;
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// A connected UDP socket (non-blocking reads).
pub struct Udp(pub UdpSocket);

impl Datagrams for Udp {
    fn send(&mut self, d: &[u8]) -> io::Result<()> {
        self.0.send(d).map(|_| ())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

/// Queues, for in-memory tests.
#[derive(Default)]
pub struct Memory {
    pub inbox: std::collections::VecDeque<Vec<u8>>,
    pub outbox: std::collections::VecDeque<Vec<u8>>,
}

impl Datagrams for Memory {
    fn send(&mut self, d: &[u8]) -> io::Result<()> {
        self.outbox.push_back(d.to_vec());
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
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

pub struct Io<T>(pub T);

impl<T: Datagrams> Read for Io<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.recv(buf) {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(io::ErrorKind::WouldBlock.into()),
            r => r,
        }
    }
}

impl<T: Datagrams> Write for Io<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("handshake failed: {0}")]
    Failed(String),
    #[error("handshake timed out")]
    Timeout,
    #[error(transparent)]
    Openssl(#[from] ErrorStack),
}

pub struct DtlsClient<T: Datagrams> {
    stream: SslStream<Io<T>>,
    pub connected: bool,
}

const DTLS_CTRL_HANDLE_TIMEOUT: std::ffi::c_int = 74;

impl<T: Datagrams> DtlsClient<T> {
    pub fn new(ctx: &SslContext, transport: T) -> Result<Self, ClientError> {
        let mut ssl = Ssl::new(ctx)?;
        ssl.set_connect_state();
        ssl.set_mtu(1200)?;
        Ok(DtlsClient {
            stream: SslStream::new(ssl, Io(transport))?,
            connected: false,
        })
    }

    pub fn transport(&mut self) -> &mut T {
        &mut self.stream.get_mut().0
    }

    pub fn ssl(&self) -> &openssl::ssl::SslRef {
        self.stream.ssl()
    }

    /// Advances the handshake with what has arrived; Ok(true) once done.
    pub fn handshake_step(&mut self) -> Result<bool, ClientError> {
        if self.connected {
            return Ok(true);
        }
        match self.stream.do_handshake() {
            Ok(()) => {
                self.connected = true;
                Ok(true)
            }
            Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
                Ok(false)
            }
            Err(e) => Err(ClientError::Failed(
                e.ssl_error()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string()),
            )),
        }
    }

    /// Lets OpenSSL retransmit its flight if its timer expired.
    pub fn handle_timeout(&mut self) {
        use foreign_types::ForeignTypeRef;
        // SAFETY: control call on a live SSL object.
        unsafe {
            openssl_sys::SSL_ctrl(
                self.stream.ssl().as_ptr(),
                DTLS_CTRL_HANDLE_TIMEOUT,
                0,
                std::ptr::null_mut(),
            );
        }
    }

    /// Blocking handshake (the transport's reads should time out every few
    /// milliseconds so retransmission timers run).
    pub fn handshake(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let end = Instant::now() + timeout;
        while !self.handshake_step()? {
            if Instant::now() > end {
                return Err(ClientError::Timeout);
            }
            self.handle_timeout();
        }
        Ok(())
    }

    /// Sends one application record.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream
            .ssl_write(data)
            .map(|_| ())
            .map_err(io::Error::other)
    }

    /// One application record, if one is readable now.
    pub fn try_recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 2048];
        match self.stream.ssl_read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => Ok(None),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "close_notify",
            )),
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }

    /// Sends close_notify.
    pub fn shutdown(&mut self) {
        let _ = self.stream.shutdown();
    }
}

impl DtlsClient<Udp> {
    /// Connects a UDP socket from `bind` to `server` and handshakes.
    pub fn connect(
        ctx: &SslContext,
        bind: std::net::SocketAddr,
        server: std::net::SocketAddr,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let s = UdpSocket::bind(bind).map_err(|e| ClientError::Failed(e.to_string()))?;
        s.connect(server)
            .map_err(|e| ClientError::Failed(e.to_string()))?;
        s.set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(|e| ClientError::Failed(e.to_string()))?;
        let mut c = DtlsClient::new(ctx, Udp(s))?;
        c.handshake(timeout)?;
        Ok(c)
    }

    /// The UDP socket under the session.
    pub fn transport_socket(&mut self) -> &UdpSocket {
        &self.stream.get_mut().0 .0
    }

    /// Waits up to `timeout` for one application record.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(d) = self.try_recv()? {
                return Ok(Some(d));
            }
            if Instant::now() > end {
                return Ok(None);
            }
        }
    }
}
