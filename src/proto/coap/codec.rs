//! CoAP message codec (RFC 7252 §3), zero-copy.
//!
//! [`Message::decode`] validates a datagram in one pass over its options and
//! returns a view whose token, options and payload borrow from the receive
//! buffer, with the options the LwM2M layers need already extracted; decoding
//! allocates nothing. Messages are written with
//! [`MessageBuilder`](super::MessageBuilder).
//!
//! Invariants: decoding never panics and never reads out of bounds on any input
//! (fuzzed in `fuzz/`); a `Message` that decoded successfully has a well-formed
//! option sequence, so iterating its options cannot fail.

use std::fmt;

/// CoAP version 1 (RFC 7252 §3: "Implementations of this specification MUST set
/// this field to 1").
pub const VERSION: u8 = 1;
/// RFC 7252 §3: payload marker.
pub const PAYLOAD_MARKER: u8 = 0xFF;

/// Message type (RFC 7252 §3, §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    Con = 0,
    Non = 1,
    Ack = 2,
    Rst = 3,
}

impl MsgType {
    fn from_bits(b: u8) -> MsgType {
        match b & 3 {
            0 => MsgType::Con,
            1 => MsgType::Non,
            2 => MsgType::Ack,
            _ => MsgType::Rst,
        }
    }
}

/// A CoAP code `c.dd` (RFC 7252 §3, §12.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code(pub u8);

impl Code {
    pub const EMPTY: Code = Code(0);
    pub const GET: Code = Code(1);
    pub const POST: Code = Code(2);
    pub const PUT: Code = Code(3);
    pub const DELETE: Code = Code(4);
    pub const FETCH: Code = Code(5);
    pub const PATCH: Code = Code(6);
    pub const IPATCH: Code = Code(7);

    pub const CREATED: Code = Code::new(2, 1);
    pub const DELETED: Code = Code::new(2, 2);
    pub const VALID: Code = Code::new(2, 3);
    pub const CHANGED: Code = Code::new(2, 4);
    pub const CONTENT: Code = Code::new(2, 5);
    pub const CONTINUE: Code = Code::new(2, 31);
    pub const BAD_REQUEST: Code = Code::new(4, 0);
    pub const UNAUTHORIZED: Code = Code::new(4, 1);
    pub const BAD_OPTION: Code = Code::new(4, 2);
    pub const FORBIDDEN: Code = Code::new(4, 3);
    pub const NOT_FOUND: Code = Code::new(4, 4);
    pub const METHOD_NOT_ALLOWED: Code = Code::new(4, 5);
    pub const NOT_ACCEPTABLE: Code = Code::new(4, 6);
    pub const REQUEST_ENTITY_INCOMPLETE: Code = Code::new(4, 8);
    pub const PRECONDITION_FAILED: Code = Code::new(4, 12);
    pub const REQUEST_ENTITY_TOO_LARGE: Code = Code::new(4, 13);
    pub const UNSUPPORTED_CONTENT_FORMAT: Code = Code::new(4, 15);
    pub const INTERNAL_SERVER_ERROR: Code = Code::new(5, 0);
    pub const NOT_IMPLEMENTED: Code = Code::new(5, 1);
    pub const SERVICE_UNAVAILABLE: Code = Code::new(5, 3);

    pub const fn new(class: u8, detail: u8) -> Code {
        Code((class << 5) | (detail & 0x1f))
    }
    pub fn class(self) -> u8 {
        self.0 >> 5
    }
    pub fn detail(self) -> u8 {
        self.0 & 0x1f
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Request codes are 0.01–0.31 (RFC 7252 §12.1.1).
    pub fn is_request(self) -> bool {
        self.class() == 0 && self.0 != 0
    }
    /// Response codes are classes 2, 4 and 5 (RFC 7252 §12.1.2).
    pub fn is_response(self) -> bool {
        matches!(self.class(), 2 | 4 | 5)
    }
    pub fn is_success(self) -> bool {
        self.class() == 2
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.class(), self.detail())
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Option numbers (RFC 7252 §5.10, RFC 7641 §2, RFC 7959 §2.1).
pub mod opt {
    pub const IF_MATCH: u16 = 1;
    pub const URI_HOST: u16 = 3;
    pub const ETAG: u16 = 4;
    pub const IF_NONE_MATCH: u16 = 5;
    pub const OBSERVE: u16 = 6;
    pub const URI_PORT: u16 = 7;
    pub const LOCATION_PATH: u16 = 8;
    pub const URI_PATH: u16 = 11;
    pub const CONTENT_FORMAT: u16 = 12;
    pub const MAX_AGE: u16 = 14;
    pub const URI_QUERY: u16 = 15;
    pub const ACCEPT: u16 = 17;
    pub const LOCATION_QUERY: u16 = 20;
    pub const BLOCK2: u16 = 23;
    pub const BLOCK1: u16 = 27;
    pub const SIZE2: u16 = 28;
    pub const PROXY_URI: u16 = 35;
    pub const PROXY_SCHEME: u16 = 39;
    pub const SIZE1: u16 = 60;
    pub const NO_RESPONSE: u16 = 258;

    /// RFC 7252 §5.4.1: odd option numbers are critical.
    pub fn is_critical(number: u16) -> bool {
        number & 1 == 1
    }

    /// Options this server understands when they appear in a request. A critical
    /// option not listed here makes the request fail with 4.02 (RFC 7252 §5.4.1).
    pub fn is_known(number: u16) -> bool {
        matches!(
            number,
            IF_MATCH
                | URI_HOST
                | ETAG
                | IF_NONE_MATCH
                | OBSERVE
                | URI_PORT
                | LOCATION_PATH
                | URI_PATH
                | CONTENT_FORMAT
                | MAX_AGE
                | URI_QUERY
                | ACCEPT
                | LOCATION_QUERY
                | BLOCK2
                | BLOCK1
                | SIZE2
                | SIZE1
                | NO_RESPONSE
        )
    }
}

/// Why a datagram is not a CoAP message (RFC 7252 §3 "message format error").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram shorter than the 4-byte header")]
    TooShort,
    #[error("unsupported CoAP version {0}")]
    BadVersion(u8),
    #[error("token length {0} is reserved")]
    BadTokenLength(u8),
    #[error("token runs past the end of the datagram")]
    TruncatedToken,
    #[error("option delta or length nibble 15 is reserved")]
    ReservedNibble,
    #[error("option runs past the end of the datagram")]
    TruncatedOption,
    #[error("option number overflows 16 bits")]
    OptionOverflow,
    #[error("payload marker followed by an empty payload")]
    EmptyPayload,
    #[error("empty message (0.00) with a token, options or payload")]
    NonEmptyEmpty,
}

/// A span of consecutive options with one number (e.g. all Uri-Path
/// segments): byte range within the option area and the option number that
/// precedes the span, so the span can be walked without rescanning.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: u16,
    end: u16,
    base: u16,
}

/// A decoded CoAP message; every slice borrows from the datagram.
///
/// [`Message::decode`] walks the options exactly once: it validates them and
/// records the ones the LwM2M layers look at (Observe, Content-Format,
/// Accept, Block1/2, Size1/2, Max-Age, the Uri-Path and Uri-Query spans, the
/// first unknown critical option), so later lookups cost nothing.
#[derive(Clone, Copy)]
pub struct Message<'a> {
    pub mtype: MsgType,
    pub code: Code,
    pub message_id: u16,
    pub token: &'a [u8],
    options: &'a [u8],
    pub payload: &'a [u8],
    observe: Option<u32>,
    content_format: Option<u16>,
    accept: Option<u16>,
    max_age: Option<u32>,
    block1: Option<u32>,
    block2: Option<u32>,
    size1: Option<u32>,
    size2: Option<u32>,
    unknown_critical: Option<u16>,
    path: Span,
    query: Span,
    location: Span,
}

impl fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("type", &self.mtype)
            .field("code", &self.code)
            .field("mid", &self.message_id)
            .field("token", &self.token)
            .field("options", &self.options().collect::<Vec<_>>())
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// The fixed header of a datagram, readable even when the rest is malformed, so
/// a malformed CON can still be rejected with a matching RST (RFC 7252 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub mtype: MsgType,
    pub code: Code,
    pub message_id: u16,
}

impl Header {
    pub fn peek(buf: &[u8]) -> Option<Header> {
        if buf.len() < 4 {
            return None;
        }
        Some(Header {
            version: buf[0] >> 6,
            mtype: MsgType::from_bits(buf[0] >> 4),
            code: Code(buf[1]),
            message_id: u16::from_be_bytes([buf[2], buf[3]]),
        })
    }
}

/// One option: its absolute number and value bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoapOption<'a> {
    pub number: u16,
    pub value: &'a [u8],
}

impl<'a> CoapOption<'a> {
    /// uint option value (RFC 7252 §3.2): big-endian, leading zeros may be
    /// stripped; values longer than 4 bytes are not uints of ours.
    pub fn as_uint(&self) -> Option<u32> {
        decode_uint(self.value)
    }
    pub fn as_str(&self) -> Option<&'a str> {
        std::str::from_utf8(self.value).ok()
    }
}

pub fn decode_uint(v: &[u8]) -> Option<u32> {
    if v.len() > 4 {
        return None;
    }
    Some(v.iter().fold(0u32, |acc, b| (acc << 8) | *b as u32))
}

/// Reads one option header starting at `buf[0]`; returns (delta, len, header_size)
/// or `None` at the payload marker.
#[inline]
fn read_option_header(buf: &[u8]) -> Result<Option<(u32, usize, usize)>, DecodeError> {
    let first = buf[0];
    if first == PAYLOAD_MARKER {
        return Ok(None);
    }
    let mut pos = 1;
    let mut ext = |nibble: u8| -> Result<u32, DecodeError> {
        match nibble {
            0..=12 => Ok(nibble as u32),
            13 => {
                let b = *buf.get(pos).ok_or(DecodeError::TruncatedOption)?;
                pos += 1;
                Ok(b as u32 + 13)
            }
            14 => {
                let hi = *buf.get(pos).ok_or(DecodeError::TruncatedOption)?;
                let lo = *buf.get(pos + 1).ok_or(DecodeError::TruncatedOption)?;
                pos += 2;
                Ok(u16::from_be_bytes([hi, lo]) as u32 + 269)
            }
            _ => Err(DecodeError::ReservedNibble),
        }
    };
    let delta = ext(first >> 4)?;
    let len = ext(first & 0x0f)? as usize;
    Ok(Some((delta, len, pos)))
}

impl<'a> Message<'a> {
    /// Decodes and validates a datagram (RFC 7252 §3), scanning the options
    /// once.
    pub fn decode(buf: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        let h = Header::peek(buf).ok_or(DecodeError::TooShort)?;
        if h.version != VERSION {
            return Err(DecodeError::BadVersion(h.version));
        }
        let tkl = buf[0] & 0x0f;
        if tkl > 8 {
            // RFC 7252 §3: lengths 9-15 are reserved, MUST be processed as a
            // message format error.
            return Err(DecodeError::BadTokenLength(tkl));
        }
        let tend = 4 + tkl as usize;
        if buf.len() < tend {
            return Err(DecodeError::TruncatedToken);
        }
        let token = &buf[4..tend];
        let rest = &buf[tend..];
        let mut m = Message {
            mtype: h.mtype,
            code: h.code,
            message_id: h.message_id,
            token,
            options: &[],
            payload: &[],
            observe: None,
            content_format: None,
            accept: None,
            max_age: None,
            block1: None,
            block2: None,
            size1: None,
            size2: None,
            unknown_critical: None,
            path: Span::default(),
            query: Span::default(),
            location: Span::default(),
        };
        let mut pos = 0usize;
        let mut number = 0u32;
        let mut options_end = rest.len();
        let mut seen = 0u16;
        while pos < rest.len() {
            match read_option_header(&rest[pos..])? {
                None => {
                    // RFC 7252 §3: a marker followed by a zero-length payload
                    // MUST be processed as a message format error.
                    if pos + 1 == rest.len() {
                        return Err(DecodeError::EmptyPayload);
                    }
                    options_end = pos;
                    m.payload = &rest[pos + 1..];
                    break;
                }
                Some((delta, len, hsize)) => {
                    let prev = number;
                    number += delta;
                    if number > u16::MAX as u32 {
                        return Err(DecodeError::OptionOverflow);
                    }
                    let vstart = pos.checked_add(hsize).ok_or(DecodeError::TruncatedOption)?;
                    let end = vstart
                        .checked_add(len)
                        .ok_or(DecodeError::TruncatedOption)?;
                    if end > rest.len() {
                        return Err(DecodeError::TruncatedOption);
                    }
                    m.record_option(
                        number as u16,
                        prev as u16,
                        pos,
                        end,
                        &rest[vstart..end],
                        &mut seen,
                    );
                    pos = end;
                }
            }
        }
        m.options = &rest[..options_end];
        // RFC 7252 §4.1: an Empty message has only the 4-byte header.
        if h.code.is_empty() && (tkl != 0 || !m.options.is_empty() || !m.payload.is_empty()) {
            return Err(DecodeError::NonEmptyEmpty);
        }
        Ok(m)
    }

    /// Notes one option seen by the scan in [`Message::decode`]. Spans are
    /// byte offsets within the option area; datagrams are far below 64 KiB,
    /// larger offsets simply leave the span empty.
    fn record_option(
        &mut self,
        number: u16,
        prev: u16,
        start: usize,
        end: usize,
        value: &[u8],
        seen: &mut u16,
    ) {
        let extend = |span: &mut Span| {
            let (Ok(s), Ok(e)) = (u16::try_from(start), u16::try_from(end)) else {
                return;
            };
            if span.end == 0 {
                *span = Span {
                    start: s,
                    end: e,
                    base: prev,
                };
            } else {
                span.end = e;
            }
        };
        // Repeated non-repeatable options: the first occurrence counts (RFC
        // 7252 §5.4.5 lets us treat the rest as unrecognised; being elective
        // they are ignored). `seen` has one bit per recorded option.
        let mut first = |bit: u16| {
            let new = *seen & bit == 0;
            *seen |= bit;
            new
        };
        let uint = || decode_uint(value);
        let u16v = || decode_uint(value).and_then(|v| u16::try_from(v).ok());
        match number {
            opt::URI_PATH => extend(&mut self.path),
            opt::URI_QUERY => extend(&mut self.query),
            opt::LOCATION_PATH => extend(&mut self.location),
            opt::OBSERVE if first(1) => self.observe = uint(),
            opt::CONTENT_FORMAT if first(2) => self.content_format = u16v(),
            opt::ACCEPT if first(4) => self.accept = u16v(),
            opt::MAX_AGE if first(8) => self.max_age = uint(),
            opt::BLOCK1 if first(16) => self.block1 = uint(),
            opt::BLOCK2 if first(32) => self.block2 = uint(),
            opt::SIZE1 if first(64) => self.size1 = uint(),
            opt::SIZE2 if first(128) => self.size2 = uint(),
            n if opt::is_critical(n) && !opt::is_known(n) && self.unknown_critical.is_none() => {
                self.unknown_critical = Some(n)
            }
            _ => {}
        }
    }

    fn span(&self, s: Span) -> impl Iterator<Item = &'a [u8]> {
        OptionIter {
            buf: self
                .options
                .get(s.start as usize..s.end as usize)
                .unwrap_or(&[]),
            number: s.base as u32,
        }
        .map(|o| o.value)
    }

    /// Uri-Path segments (RFC 7252 §5.10.1), from the span recorded by decode.
    pub fn uri_path(&self) -> impl Iterator<Item = &'a [u8]> {
        self.span(self.path)
    }

    /// Uri-Query arguments.
    pub fn uri_query(&self) -> impl Iterator<Item = &'a [u8]> {
        self.span(self.query)
    }

    /// Location-Path segments (of a 2.01 response).
    pub fn location_path(&self) -> impl Iterator<Item = &'a [u8]> {
        self.span(self.location)
    }

    /// Lazily iterates the options in wire order (ascending numbers).
    pub fn options(&self) -> OptionIter<'a> {
        OptionIter {
            buf: self.options,
            number: 0,
        }
    }

    /// First option with this number.
    pub fn option(&self, number: u16) -> Option<CoapOption<'a>> {
        self.options()
            .skip_while(|o| o.number < number)
            .take_while(|o| o.number == number)
            .next()
    }

    /// All values of a repeatable option (e.g. Uri-Path segments).
    pub fn option_values(&self, number: u16) -> impl Iterator<Item = &'a [u8]> {
        self.options()
            .skip_while(move |o| o.number < number)
            .take_while(move |o| o.number == number)
            .map(|o| o.value)
    }

    pub fn uint_option(&self, number: u16) -> Option<u32> {
        match number {
            opt::OBSERVE => self.observe,
            opt::MAX_AGE => self.max_age,
            opt::BLOCK1 => self.block1,
            opt::BLOCK2 => self.block2,
            opt::SIZE1 => self.size1,
            opt::SIZE2 => self.size2,
            opt::CONTENT_FORMAT => self.content_format.map(u32::from),
            opt::ACCEPT => self.accept.map(u32::from),
            _ => self.option(number).and_then(|o| o.as_uint()),
        }
    }

    pub fn content_format(&self) -> Option<u16> {
        self.content_format
    }

    pub fn accept(&self) -> Option<u16> {
        self.accept
    }

    pub fn observe(&self) -> Option<u32> {
        self.observe
    }

    pub fn max_age(&self) -> Option<u32> {
        self.max_age
    }

    /// Block1 / Block2 (RFC 7959 §2.2), when present and well-formed.
    pub fn block1(&self) -> Option<Block> {
        self.block1.and_then(Block::decode)
    }

    pub fn block2(&self) -> Option<Block> {
        self.block2.and_then(Block::decode)
    }

    pub fn size1(&self) -> Option<u32> {
        self.size1
    }

    /// The first unrecognised critical option (RFC 7252 §5.4.1).
    pub fn unknown_critical_option(&self) -> Option<u16> {
        self.unknown_critical
    }

    /// True when the Uri-Path segments equal `segments`.
    pub fn path_is(&self, segments: &[&str]) -> bool {
        let mut it = self.uri_path();
        for s in segments {
            match it.next() {
                Some(v) if v == s.as_bytes() => {}
                _ => return false,
            }
        }
        it.next().is_none()
    }
}

/// Iterator over the options of a validated message.
pub struct OptionIter<'a> {
    buf: &'a [u8],
    number: u32,
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = CoapOption<'a>;
    fn next(&mut self) -> Option<CoapOption<'a>> {
        if self.buf.is_empty() {
            return None;
        }
        // The message was validated in `decode`; a failure here can only mean
        // the iterator was built over other bytes, so it simply ends.
        let (delta, len, hsize) = read_option_header(self.buf).ok()??;
        let end = hsize.checked_add(len)?;
        let value = self.buf.get(hsize..end)?;
        self.number += delta;
        self.buf = &self.buf[end..];
        Some(CoapOption {
            number: u16::try_from(self.number).ok()?,
            value,
        })
    }
}

/// Block option value (RFC 7959 §2.2): NUM, M, SZX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub num: u32,
    pub more: bool,
    pub szx: u8,
}

impl Block {
    pub fn decode(v: u32) -> Option<Block> {
        let szx = (v & 7) as u8;
        if szx == 7 {
            // RFC 7959 §2.2: SZX 7 is reserved.
            return None;
        }
        Some(Block {
            num: v >> 4,
            more: v & 8 != 0,
            szx,
        })
    }
    pub fn encode(&self) -> u32 {
        (self.num << 4) | ((self.more as u32) << 3) | self.szx as u32
    }
    pub fn size(&self) -> usize {
        1 << (self.szx as usize + 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::coap::MessageBuilder;
    use proptest::prelude::*;

    fn enc(
        mtype: MsgType,
        code: Code,
        mid: u16,
        token: &[u8],
        opts: &[(u16, Vec<u8>)],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut b = MessageBuilder::new(mtype, code)
            .mid(mid)
            .token(token)
            .payload(payload);
        for (n, v) in opts {
            b = b.option(*n, v);
        }
        b.to_vec()
    }

    #[test]
    fn decodes_rfc7252_example_get() {
        // CON GET /temperature, mid 0x7d34, no token (RFC 7252 Appendix A, Fig. 16).
        let d = [
            0x40, 0x01, 0x7d, 0x34, 0xbb, b't', b'e', b'm', b'p', b'e', b'r', b'a', b't', b'u',
            b'r', b'e',
        ];
        let m = Message::decode(&d).unwrap();
        assert_eq!(m.mtype, MsgType::Con);
        assert_eq!(m.code, Code::GET);
        assert_eq!(m.message_id, 0x7d34);
        assert!(m.path_is(&["temperature"]));
        assert!(m.payload.is_empty());
    }

    #[test]
    fn rejects_format_errors() {
        assert_eq!(
            Message::decode(&[0x40, 1]).unwrap_err(),
            DecodeError::TooShort
        );
        assert_eq!(
            Message::decode(&[0x80, 1, 0, 0]).unwrap_err(),
            DecodeError::BadVersion(2)
        );
        assert_eq!(
            Message::decode(&[0x49, 1, 0, 0]).unwrap_err(),
            DecodeError::BadTokenLength(9)
        );
        assert_eq!(
            Message::decode(&[0x42, 1, 0, 0, 1]).unwrap_err(),
            DecodeError::TruncatedToken
        );
        assert_eq!(
            Message::decode(&[0x40, 1, 0, 0, 0xff]).unwrap_err(),
            DecodeError::EmptyPayload
        );
        assert_eq!(
            Message::decode(&[0x40, 1, 0, 0, 0xf1, 0]).unwrap_err(),
            DecodeError::ReservedNibble
        );
        assert_eq!(
            Message::decode(&[0x40, 1, 0, 0, 0xb5, b'a']).unwrap_err(),
            DecodeError::TruncatedOption
        );
        assert_eq!(
            Message::decode(&[0x41, 0, 0, 0, 7]).unwrap_err(),
            DecodeError::NonEmptyEmpty
        );
    }

    #[test]
    fn extended_option_deltas_and_lengths() {
        let long = vec![b'x'; 300];
        let d = enc(
            MsgType::Non,
            Code::CONTENT,
            9,
            &[1, 2, 3],
            &[(opt::NO_RESPONSE, vec![26]), (opt::URI_PATH, long.clone())],
            b"hi",
        );
        let m = Message::decode(&d).unwrap();
        let o: Vec<_> = m.options().collect();
        assert_eq!(o.len(), 2);
        assert_eq!(o[0].number, opt::URI_PATH);
        assert_eq!(o[0].value, &long[..]);
        assert_eq!(o[1].number, opt::NO_RESPONSE);
        assert_eq!(m.payload, b"hi");
        assert_eq!(m.unknown_critical_option(), None);
    }

    #[test]
    fn unknown_critical_option_is_reported() {
        let d = enc(MsgType::Con, Code::GET, 1, &[], &[(9, vec![1])], b"");
        assert_eq!(
            Message::decode(&d).unwrap().unknown_critical_option(),
            Some(9)
        );
        let d = enc(MsgType::Con, Code::GET, 1, &[], &[(10, vec![1])], b"");
        assert_eq!(Message::decode(&d).unwrap().unknown_critical_option(), None);
    }

    #[test]
    fn uint_and_block() {
        let m = MessageBuilder::new(MsgType::Con, Code::GET)
            .uint_option(opt::MAX_AGE, 0)
            .uint_option(opt::SIZE1, 0x1234)
            .to_vec();
        assert_eq!(&m[4..], &[0xd0, 0x01, 0xd2, 0x21, 0x12, 0x34]);
        let d = Message::decode(&m).unwrap();
        assert_eq!((d.max_age(), d.size1()), (Some(0), Some(0x1234)));
        let blk = Block::decode(0x1e).unwrap();
        assert_eq!((blk.num, blk.more, blk.size()), (1, true, 1024));
        assert_eq!(blk.encode(), 0x1e);
        assert!(Block::decode(7).is_none());
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(m) = Message::decode(&data) {
                for o in m.options() { let _ = o.as_uint(); }
            }
        }

        #[test]
        fn roundtrip(
            t in 0u8..4, code in 1u8..=255, mid: u16,
            token in proptest::collection::vec(any::<u8>(), 0..=8),
            opts in proptest::collection::vec((prop_oneof![1u16..2000, Just(11u16), Just(15u16), Just(6u16), Just(14u16)], proptest::collection::vec(any::<u8>(), 0..300)), 0..8),
            payload in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let mtype = MsgType::from_bits(t);
            let d = enc(mtype, Code(code), mid, &token, &opts, &payload);
            let m = Message::decode(&d).unwrap();
            prop_assert_eq!(m.mtype, mtype);
            prop_assert_eq!(m.code, Code(code));
            prop_assert_eq!(m.message_id, mid);
            prop_assert_eq!(m.token, &token[..]);
            prop_assert_eq!(m.payload, &payload[..]);
            let mut sorted = opts.clone();
            sorted.sort_by_key(|o| o.0);
            let got: Vec<(u16, Vec<u8>)> = m.options().map(|o| (o.number, o.value.to_vec())).collect();
            prop_assert_eq!(&got, &sorted);
            // The spans and values recorded by the single scan agree with a
            // full walk of the options.
            let of = |n: u16| -> Vec<Vec<u8>> {
                sorted.iter().filter(|o| o.0 == n).map(|o| o.1.clone()).collect()
            };
            prop_assert_eq!(m.uri_path().map(<[u8]>::to_vec).collect::<Vec<_>>(), of(opt::URI_PATH));
            prop_assert_eq!(m.uri_query().map(<[u8]>::to_vec).collect::<Vec<_>>(), of(opt::URI_QUERY));
            let first_uint = |n: u16| of(n).first().and_then(|v| decode_uint(v));
            prop_assert_eq!(m.observe(), first_uint(opt::OBSERVE));
            prop_assert_eq!(m.max_age(), first_uint(opt::MAX_AGE));
            let crit = sorted.iter().map(|o| o.0).find(|n| opt::is_critical(*n) && !opt::is_known(*n));
            prop_assert_eq!(m.unknown_critical_option(), crit);
        }
    }
}
