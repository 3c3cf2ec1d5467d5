//! DTLS 1.2 records (RFC 6347 §4.1) as views over the receive buffer.
//!
//! ```text
//! struct {
//!     ContentType type;              (1)
//!     ProtocolVersion version;       (2)   {254, 253} = DTLS 1.2, {254, 255} = 1.0
//!     uint16 epoch;                  (2)
//!     uint48 sequence_number;        (6)
//!     uint16 length;                 (2)
//!     opaque fragment[length];
//! } DTLSPlaintext / DTLSCiphertext;
//! ```
//!
//! A datagram holds one or more records back to back (§4.1.1).
//! [`Records`] walks them without copying; a truncated or malformed record
//! ends the walk with an error and is never read past (RFC 6347 §4.1.2.7:
//! invalid records are silently discarded).

/// Content types (RFC 5246 §6.2.1, RFC 9146 §4 for `tls12_cid`).
pub mod content_type {
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
    pub const TLS12_CID: u8 = 25;
}

/// DTLS 1.2 on the wire (RFC 6347 §4.1: the one's complement of TLS 1.2).
pub const DTLS1_2: u16 = 0xfefd;
/// DTLS 1.0, which HelloVerifyRequest carries (RFC 6347 §4.2.1).
pub const DTLS1_0: u16 = 0xfeff;
/// Record header length.
pub const HEADER_LEN: usize = 13;
/// Largest record payload accepted (2^14 plus expansion, RFC 6347 §4.1).
pub const MAX_FRAGMENT: usize = (1 << 14) + 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record header truncated")]
    Truncated,
    #[error("record fragment runs past the datagram")]
    TruncatedFragment,
    #[error("record fragment longer than 2^14 + 2048")]
    TooLong,
    #[error("not a DTLS version: {0:#06x}")]
    BadVersion(u16),
}

/// One record: header fields and a view of its fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub content_type: u8,
    pub version: u16,
    pub epoch: u16,
    /// 48-bit record sequence number.
    pub seq: u64,
    pub fragment: &'a [u8],
    /// The 13 header bytes (the AEAD additional data is built from them).
    pub header: &'a [u8],
}

impl Record<'_> {
    /// `epoch << 48 | seq`, the 64-bit sequence used in nonces and AAD.
    pub fn epoch_seq(&self) -> u64 {
        ((self.epoch as u64) << 48) | self.seq
    }
}

/// Parses the record at the start of `buf`; returns it and the rest.
pub fn parse(buf: &[u8]) -> Result<(Record<'_>, &[u8]), RecordError> {
    if buf.len() < HEADER_LEN {
        return Err(RecordError::Truncated);
    }
    let version = u16::from_be_bytes([buf[1], buf[2]]);
    // RFC 6347 §4.1: the major byte of every DTLS version is 254.
    if version >> 8 != 0xfe {
        return Err(RecordError::BadVersion(version));
    }
    let epoch = u16::from_be_bytes([buf[3], buf[4]]);
    let seq = buf[5..11].iter().fold(0u64, |a, b| (a << 8) | *b as u64);
    let len = u16::from_be_bytes([buf[11], buf[12]]) as usize;
    if len > MAX_FRAGMENT {
        return Err(RecordError::TooLong);
    }
    let end = HEADER_LEN + len;
    if buf.len() < end {
        return Err(RecordError::TruncatedFragment);
    }
    Ok((
        Record {
            content_type: buf[0],
            version,
            epoch,
            seq,
            fragment: &buf[HEADER_LEN..end],
            header: &buf[..HEADER_LEN],
        },
        &buf[end..],
    ))
}

/// Iterates the records of a datagram; stops at the first malformed one
/// (yielding its error once).
pub struct Records<'a> {
    rest: &'a [u8],
    failed: bool,
}

pub fn records(datagram: &[u8]) -> Records<'_> {
    Records {
        rest: datagram,
        failed: false,
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, RecordError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        match parse(self.rest) {
            Ok((r, rest)) => {
                self.rest = rest;
                Some(Ok(r))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Appends a record header for a fragment of `len` bytes.
pub fn write_header(
    out: &mut Vec<u8>,
    content_type: u8,
    version: u16,
    epoch: u16,
    seq: u64,
    len: usize,
) {
    out.push(content_type);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes()[2..]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
}

/// True when the datagram's first byte could start a DTLS record (RFC 7983
/// demultiplexing: 20..=63). CoAP starts 0x40..=0x7f (version 1).
pub fn looks_like_dtls(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| (20..=63).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn two_records_in_a_datagram() {
        let mut d = Vec::new();
        write_header(&mut d, content_type::HANDSHAKE, DTLS1_2, 0, 7, 3);
        d.extend_from_slice(&[1, 2, 3]);
        write_header(
            &mut d,
            content_type::APPLICATION_DATA,
            DTLS1_2,
            1,
            0x0000_1234_5678,
            0,
        );
        let rs: Vec<_> = records(&d).collect();
        assert_eq!(rs.len(), 2);
        let a = rs[0].unwrap();
        assert_eq!(
            (a.content_type, a.epoch, a.seq, a.fragment),
            (22, 0, 7, &[1u8, 2, 3][..])
        );
        let b = rs[1].unwrap();
        assert_eq!(
            (b.epoch, b.seq, b.epoch_seq()),
            (1, 0x1234_5678, (1 << 48) | 0x1234_5678)
        );
        // Truncation ends the walk with an error, never reads past the end.
        let rs: Vec<_> = records(&d[..d.len() - 1]).collect();
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[1], Err(RecordError::Truncated));
        let mut bad = d.clone();
        bad[1] = 3;
        assert_eq!(
            records(&bad).next(),
            Some(Err(RecordError::BadVersion(0x03fd)))
        );
        assert!(looks_like_dtls(&d) && !looks_like_dtls(&[0x40, 1, 0, 0]));
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut total = 0;
            for r in records(&data) {
                match r {
                    Ok(r) => total += HEADER_LEN + r.fragment.len(),
                    Err(_) => break,
                }
            }
            prop_assert!(total <= data.len());
        }
    }
}
