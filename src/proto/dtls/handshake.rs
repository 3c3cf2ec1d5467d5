//! DTLS handshake messages the shard reads itself (RFC 6347 §4.2), as views
//! over the receive buffer: the handshake header, the ClientHello, and the
//! HelloVerifyRequest the stateless cookie exchange answers with.
//!
//! ```text
//! struct {                                  RFC 6347 §4.2.2
//!     HandshakeType msg_type;    (1)
//!     uint24 length;             (3)
//!     uint16 message_seq;        (2)
//!     uint24 fragment_offset;    (3)
//!     uint24 fragment_length;    (3)
//!     body
//! } Handshake;
//!
//! struct {                                  RFC 6347 §4.2.1, RFC 5246 §7.4.1.2
//!     ProtocolVersion client_version;            (2)
//!     Random random;                             (32)
//!     SessionID session_id;                      <0..32>
//!     opaque cookie<0..2^8-1>;
//!     CipherSuite cipher_suites<2..2^16-2>;
//!     CompressionMethod compression_methods<1..2^8-1>;
//!     Extension extensions<0..2^16-1>;           (optional)
//! } ClientHello;
//! ```

use super::record::{self, content_type, Record, DTLS1_0, HEADER_LEN};

/// Handshake message types (RFC 5246 §7.4, RFC 6347 §4.3.2).
pub mod msg_type {
    pub const CLIENT_HELLO: u8 = 1;
    pub const SERVER_HELLO: u8 = 2;
    pub const HELLO_VERIFY_REQUEST: u8 = 3;
    pub const FINISHED: u8 = 20;
}

/// Handshake header length.
pub const HEADER: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not a handshake record")]
    NotHandshake,
    #[error("handshake header truncated")]
    Truncated,
    #[error("not a ClientHello")]
    NotClientHello,
    #[error("fragmented ClientHello")]
    Fragmented,
    #[error("ClientHello body malformed")]
    Malformed,
    #[error("ClientHello in an epoch other than 0")]
    Epoch,
}

/// A handshake message header and its fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    pub msg_type: u8,
    pub length: u32,
    pub message_seq: u16,
    pub fragment_offset: u32,
    pub fragment: &'a [u8],
}

fn u24(b: &[u8]) -> u32 {
    ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32
}

/// Parses the first handshake header of a handshake record's fragment.
pub fn parse_header(frag: &[u8]) -> Result<Header<'_>, HelloError> {
    if frag.len() < HEADER {
        return Err(HelloError::Truncated);
    }
    let length = u24(&frag[1..4]);
    let fragment_offset = u24(&frag[6..9]);
    let fragment_length = u24(&frag[9..12]) as usize;
    let body = frag
        .get(HEADER..HEADER + fragment_length)
        .ok_or(HelloError::Truncated)?;
    if fragment_offset as u64 + fragment_length as u64 > length as u64 {
        return Err(HelloError::Truncated);
    }
    Ok(Header {
        msg_type: frag[0],
        length,
        message_seq: u16::from_be_bytes([frag[4], frag[5]]),
        fragment_offset,
        fragment: body,
    })
}

/// A ClientHello, every field a view into the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// The record's sequence number (the HelloVerifyRequest copies it).
    pub record_seq: u64,
    pub message_seq: u16,
    pub client_version: u16,
    pub random: &'a [u8],
    pub session_id: &'a [u8],
    pub cookie: &'a [u8],
    pub cipher_suites: &'a [u8],
    pub compression_methods: &'a [u8],
    pub extensions: &'a [u8],
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn vec8(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.take(1)?[0] as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], HelloError> {
        let l = self.take(2)?;
        self.take(u16::from_be_bytes([l[0], l[1]]) as usize)
    }
}

impl<'a> ClientHello<'a> {
    /// Reads the ClientHello in `rec` (an epoch-0 handshake record holding
    /// one unfragmented ClientHello; a fragmented one is refused, as
    /// OpenSSL's `DTLSv1_listen` does: the stateless path keeps no
    /// reassembly state).
    pub fn parse(rec: &Record<'a>) -> Result<ClientHello<'a>, HelloError> {
        if rec.content_type != content_type::HANDSHAKE {
            return Err(HelloError::NotHandshake);
        }
        if rec.epoch != 0 {
            return Err(HelloError::Epoch);
        }
        let h = parse_header(rec.fragment)?;
        if h.msg_type != msg_type::CLIENT_HELLO {
            return Err(HelloError::NotClientHello);
        }
        if h.fragment_offset != 0 || h.fragment.len() != h.length as usize {
            return Err(HelloError::Fragmented);
        }
        let mut r = Reader(h.fragment);
        let v = r.take(2)?;
        let random = r.take(32)?;
        let session_id = r.vec8()?;
        if session_id.len() > 32 {
            return Err(HelloError::Malformed);
        }
        let cookie = r.vec8()?;
        let cipher_suites = r.vec16()?;
        if cipher_suites.len() < 2 || cipher_suites.len() % 2 != 0 {
            return Err(HelloError::Malformed);
        }
        let compression_methods = r.vec8()?;
        if compression_methods.is_empty() {
            return Err(HelloError::Malformed);
        }
        let extensions = if r.0.is_empty() { r.0 } else { r.vec16()? };
        Ok(ClientHello {
            record_seq: rec.seq,
            message_seq: h.message_seq,
            client_version: u16::from_be_bytes([v[0], v[1]]),
            random,
            session_id,
            cookie,
            cipher_suites,
            compression_methods,
            extensions,
        })
    }

    /// The offered cipher suites.
    pub fn suites(&self) -> impl Iterator<Item = u16> + '_ {
        self.cipher_suites
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
    }
}

/// Extension carrying encrypt_then_mac (RFC 7366 §2).
pub const EXT_ENCRYPT_THEN_MAC: u16 = 22;

/// The extensions block of an unfragmented ServerHello in `datagram`
/// (RFC 5246 §7.4.1.3), when the datagram holds one.
pub fn server_hello_extensions(datagram: &[u8]) -> Option<&[u8]> {
    for rec in record::records(datagram) {
        let rec = rec.ok()?;
        if rec.content_type != content_type::HANDSHAKE || rec.epoch != 0 {
            continue;
        }
        let Ok(h) = parse_header(rec.fragment) else {
            continue;
        };
        if h.msg_type != msg_type::SERVER_HELLO || h.fragment_offset != 0 {
            continue;
        }
        let mut r = Reader(h.fragment);
        r.take(2 + 32).ok()?;
        r.vec8().ok()?;
        r.take(2 + 1).ok()?;
        return Some(if r.0.is_empty() { r.0 } else { r.vec16().ok()? });
    }
    None
}

/// True when an extensions block holds extension `typ`.
pub fn has_extension(mut exts: &[u8], typ: u16) -> bool {
    while exts.len() >= 4 {
        let t = u16::from_be_bytes([exts[0], exts[1]]);
        let n = u16::from_be_bytes([exts[2], exts[3]]) as usize;
        if t == typ {
            return true;
        }
        exts = exts.get(4 + n..).unwrap_or(&[]);
    }
    false
}

/// Finds a ClientHello in a datagram: the first record must carry it.
pub fn client_hello(datagram: &[u8]) -> Result<ClientHello<'_>, HelloError> {
    match record::records(datagram).next() {
        Some(Ok(rec)) => ClientHello::parse(&rec),
        _ => Err(HelloError::Truncated),
    }
}

/// Appends a HelloVerifyRequest record answering `hello` (RFC 6347 §4.2.1):
/// record version DTLS 1.0 ("DTLS 1.2 server implementations SHOULD use
/// DTLS version 1.0 regardless of the version of TLS that is expected to be
/// negotiated"), the ClientHello's record sequence number ("the server MUST
/// use the record sequence number in the ClientHello as the record sequence
/// number in the HelloVerifyRequest"), message_seq 0, server_version
/// DTLS 1.0. 25 bytes plus the cookie: with a 32-byte cookie, 60 bytes,
/// less than the smallest well-formed ClientHello (67), so it never
/// amplifies.
pub fn write_hello_verify_request(out: &mut Vec<u8>, hello: &ClientHello<'_>, cookie: &[u8]) {
    let body = 3 + cookie.len();
    record::write_header(
        out,
        content_type::HANDSHAKE,
        DTLS1_0,
        0,
        hello.record_seq,
        HEADER + body,
    );
    out.push(msg_type::HELLO_VERIFY_REQUEST);
    out.extend_from_slice(&(body as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(body as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&DTLS1_0.to_be_bytes());
    out.push(cookie.len() as u8);
    out.extend_from_slice(cookie);
}

/// Length of a HelloVerifyRequest datagram with a cookie of `cookie_len`.
pub const fn hello_verify_request_len(cookie_len: usize) -> usize {
    HEADER_LEN + HEADER + 3 + cookie_len
}

pub mod testing {
    //! Builds ClientHellos for tests (the shape a DTLS 1.2 client sends).
    use super::*;

    pub fn client_hello(
        record_seq: u64,
        message_seq: u16,
        cookie: &[u8],
        suites: &[u16],
    ) -> Vec<u8> {
        client_hello_with(7, record_seq, message_seq, cookie, suites)
    }

    /// The same with the random filled with `random`.
    pub fn client_hello_with(
        random: u8,
        record_seq: u64,
        message_seq: u16,
        cookie: &[u8],
        suites: &[u16],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&record::DTLS1_2.to_be_bytes());
        body.extend_from_slice(&[random; 32]);
        body.push(0);
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
        for s in suites {
            body.extend_from_slice(&s.to_be_bytes());
        }
        body.extend_from_slice(&[1, 0]);
        let mut out = Vec::new();
        record::write_header(
            &mut out,
            content_type::HANDSHAKE,
            record::DTLS1_2,
            0,
            record_seq,
            HEADER + body.len(),
        );
        out.push(msg_type::CLIENT_HELLO);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&message_seq.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_a_client_hello_and_answers_smaller() {
        let d = testing::client_hello(5, 0, &[], &[0xc0a8]);
        let h = client_hello(&d).unwrap();
        assert_eq!(
            (h.record_seq, h.message_seq, h.client_version),
            (5, 0, 0xfefd)
        );
        assert_eq!(h.suites().collect::<Vec<_>>(), vec![0xc0a8]);
        assert!(h.cookie.is_empty() && h.extensions.is_empty());
        let mut out = Vec::new();
        write_hello_verify_request(&mut out, &h, &[9u8; 32]);
        assert_eq!(out.len(), hello_verify_request_len(32));
        assert!(out.len() < d.len(), "{} vs {}", out.len(), d.len());
        let (rec, rest) = record::parse(&out).unwrap();
        assert!(rest.is_empty());
        assert_eq!((rec.version, rec.seq, rec.epoch), (DTLS1_0, 5, 0));
        let hh = parse_header(rec.fragment).unwrap();
        assert_eq!(
            (hh.msg_type, hh.message_seq),
            (msg_type::HELLO_VERIFY_REQUEST, 0)
        );
        assert_eq!(&hh.fragment[3..], &[9u8; 32]);

        let d2 = testing::client_hello(6, 1, &[1, 2, 3], &[0xc0a8, 0x00ae]);
        let h2 = client_hello(&d2).unwrap();
        assert_eq!((h2.message_seq, h2.cookie), (1, &[1u8, 2, 3][..]));
    }

    #[test]
    fn refuses_fragments_and_garbage() {
        let mut d = testing::client_hello(0, 0, &[], &[0xc0a8]);
        // fragment_length one less than length: a fragment.
        d[HEADER_LEN + 11] -= 1;
        d[12] -= 1;
        d.pop();
        assert_eq!(client_hello(&d), Err(HelloError::Fragmented));
        let mut e = testing::client_hello(0, 0, &[], &[0xc0a8]);
        e[HEADER_LEN] = msg_type::FINISHED;
        assert_eq!(client_hello(&e), Err(HelloError::NotClientHello));
        let mut f = testing::client_hello(0, 0, &[], &[0xc0a8]);
        f[4] = 1;
        assert_eq!(client_hello(&f), Err(HelloError::Epoch));
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = client_hello(&data);
            if data.len() >= 13 {
                let mut d = testing::client_hello(1, 1, &data[..8], &[0xc0a8]);
                d.extend_from_slice(&data);
                let _ = client_hello(&d);
                let cut = data[0] as usize % d.len();
                let _ = client_hello(&d[..cut]);
            }
        }
    }
}
