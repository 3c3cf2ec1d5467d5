//! The one CoAP message builder (RFC 7252 §3) used by the gateway, the
//! simulated devices, `lwm2m-devsim` and `lwm2m-loadgen`.
//!
//! A [`MessageBuilder`] collects header fields, options and the payload by
//! reference and writes the wire form into a caller-owned buffer with
//! [`MessageBuilder::encode`]. Options may be added in any order; they are
//! written sorted by number (stable, so repeated options such as Uri-Path keep
//! their order). Up to 8 options live inline, so building a reply allocates
//! nothing. uint options are written in their minimal form (RFC 7252 §3.2) and
//! numeric path segments (`/3303/0/5700`) as decimal text, both without
//! intermediate strings.

use super::codec::opt;
use super::codec::{Block, Code, MsgType, PAYLOAD_MARKER, VERSION};
use smallvec::SmallVec;

/// One option value, borrowed or computed at encode time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptValue<'a> {
    Bytes(&'a [u8]),
    /// uint option (RFC 7252 §3.2), minimal big-endian.
    Uint(u32),
    /// A path segment or query written as decimal digits.
    Decimal(u32),
}

impl OptValue<'_> {
    fn len(&self) -> usize {
        match self {
            OptValue::Bytes(b) => b.len(),
            OptValue::Uint(v) => 4 - (v.leading_zeros() / 8) as usize,
            OptValue::Decimal(v) => decimal_len(*v),
        }
    }
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            OptValue::Bytes(b) => out.extend_from_slice(b),
            OptValue::Uint(v) => {
                let b = v.to_be_bytes();
                out.extend_from_slice(&b[(v.leading_zeros() / 8) as usize..]);
            }
            OptValue::Decimal(v) => {
                let mut buf = [0u8; 10];
                let n = decimal_len(*v);
                let mut x = *v;
                for i in (0..n).rev() {
                    buf[i] = b'0' + (x % 10) as u8;
                    x /= 10;
                }
                out.extend_from_slice(&buf[..n]);
            }
        }
    }
}

fn decimal_len(mut v: u32) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

/// Builder for one CoAP message. Defaults: CON, code 0.00, MID 0, no token.
#[derive(Debug, Clone)]
pub struct MessageBuilder<'a> {
    mtype: MsgType,
    code: Code,
    message_id: u16,
    token: &'a [u8],
    options: SmallVec<[(u16, OptValue<'a>); 8]>,
    payload: &'a [u8],
}

impl<'a> MessageBuilder<'a> {
    /// Keeps the options sorted by number as they are added (stable: a
    /// repeated option keeps its order), so encoding needs no sort.
    fn push_opt(&mut self, number: u16, value: OptValue<'a>) {
        let at = self.options.partition_point(|(n, _)| *n <= number);
        self.options.insert(at, (number, value));
    }

    pub fn new(mtype: MsgType, code: Code) -> MessageBuilder<'a> {
        MessageBuilder {
            mtype,
            code,
            message_id: 0,
            token: &[],
            options: SmallVec::new(),
            payload: &[],
        }
    }

    /// A request (CON when `con`, else NON).
    pub fn request(code: Code, con: bool) -> MessageBuilder<'a> {
        Self::new(if con { MsgType::Con } else { MsgType::Non }, code)
    }

    /// The response to a request of type `req_type` with `req_mid`: piggybacked
    /// in an ACK for a CON (RFC 7252 §5.2.1), a NON for a NON (§5.2.3; its MID
    /// is the caller's to choose, see [`MessageBuilder::mid`]).
    pub fn response_to(req_type: MsgType, req_mid: u16, code: Code) -> MessageBuilder<'a> {
        match req_type {
            MsgType::Con => Self::new(MsgType::Ack, code).mid(req_mid),
            _ => Self::new(MsgType::Non, code).mid(req_mid),
        }
    }

    /// An empty message (ACK or RST, RFC 7252 §4.1-§4.3).
    pub fn empty(mtype: MsgType, mid: u16) -> MessageBuilder<'a> {
        Self::new(mtype, Code::EMPTY).mid(mid)
    }

    /// Changes the message type (the exchange layer sets ACK / NON on
    /// replies).
    pub fn mtype(mut self, mtype: MsgType) -> Self {
        self.mtype = mtype;
        self
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn mid(mut self, mid: u16) -> Self {
        self.message_id = mid;
        self
    }

    /// Tokens are at most 8 bytes (RFC 7252 §3); longer ones are truncated.
    pub fn token(mut self, token: &'a [u8]) -> Self {
        self.token = &token[..token.len().min(8)];
        self
    }

    pub fn option(mut self, number: u16, value: &'a [u8]) -> Self {
        self.push_opt(number, OptValue::Bytes(value));
        self
    }

    pub fn uint_option(mut self, number: u16, value: u32) -> Self {
        self.push_opt(number, OptValue::Uint(value));
        self
    }

    /// Uri-Path from `/`-separated text (`"rd"`, `"/3303/0/5700"`); empty
    /// segments are skipped.
    pub fn path(mut self, path: &'a str) -> Self {
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            self.push_opt(opt::URI_PATH, OptValue::Bytes(seg.as_bytes()));
        }
        self
    }

    /// One Uri-Path segment.
    pub fn path_segment(mut self, seg: &'a [u8]) -> Self {
        self.push_opt(opt::URI_PATH, OptValue::Bytes(seg));
        self
    }

    /// One numeric Uri-Path segment (an LwM2M object, instance or resource id).
    pub fn path_id(mut self, id: u16) -> Self {
        self.push_opt(opt::URI_PATH, OptValue::Decimal(id as u32));
        self
    }

    pub fn query(mut self, q: &'a str) -> Self {
        self.push_opt(opt::URI_QUERY, OptValue::Bytes(q.as_bytes()));
        self
    }

    /// One Location-Path segment (of a 2.01 Created, RFC 7252 §5.10.7).
    pub fn location_segment(mut self, seg: &'a [u8]) -> Self {
        self.push_opt(opt::LOCATION_PATH, OptValue::Bytes(seg));
        self
    }

    pub fn observe(self, v: u32) -> Self {
        self.uint_option(opt::OBSERVE, v & 0xff_ffff)
    }

    pub fn content_format(self, cf: u16) -> Self {
        self.uint_option(opt::CONTENT_FORMAT, cf as u32)
    }

    pub fn accept(self, cf: u16) -> Self {
        self.uint_option(opt::ACCEPT, cf as u32)
    }

    pub fn max_age(self, s: u32) -> Self {
        self.uint_option(opt::MAX_AGE, s)
    }

    pub fn block1(self, b: Block) -> Self {
        self.uint_option(opt::BLOCK1, b.encode())
    }

    pub fn block2(self, b: Block) -> Self {
        self.uint_option(opt::BLOCK2, b.encode())
    }

    pub fn size1(self, n: u32) -> Self {
        self.uint_option(opt::SIZE1, n)
    }

    /// The whole size of a Block2 body (RFC 7959 §4).
    pub fn size2(self, n: u32) -> Self {
        self.uint_option(opt::SIZE2, n)
    }

    pub fn payload(mut self, p: &'a [u8]) -> Self {
        self.payload = p;
        self
    }

    /// Bytes [`MessageBuilder::encode`] will write.
    pub fn encoded_len(&self) -> usize {
        let mut n = 4 + self.token.len();
        let mut prev = 0u16;
        for (num, v) in &self.options {
            let delta = (*num - prev) as usize;
            let len = v.len();
            n += 1 + ext_len(delta) + ext_len(len) + len;
            prev = *num;
        }
        if !self.payload.is_empty() {
            n += 1 + self.payload.len();
        }
        n
    }

    /// Appends the wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push((VERSION << 6) | ((self.mtype as u8) << 4) | self.token.len() as u8);
        out.push(self.code.0);
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(self.token);
        let mut prev = 0u16;
        for (number, value) in &self.options {
            let delta = (*number - prev) as usize;
            let len = value.len();
            out.push((nibble(delta) << 4) | nibble(len));
            write_ext(out, delta);
            write_ext(out, len);
            value.write(out);
            prev = *number;
        }
        if !self.payload.is_empty() {
            out.push(PAYLOAD_MARKER);
            out.extend_from_slice(self.payload);
        }
    }

    /// The wire form in a new buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + self.payload.len());
        self.encode(&mut v);
        v
    }
}

fn ext_len(v: usize) -> usize {
    if v >= 269 {
        2
    } else if v >= 13 {
        1
    } else {
        0
    }
}

fn write_ext(out: &mut Vec<u8>, v: usize) {
    if v >= 269 {
        out.extend_from_slice(&((v - 269).min(u16::MAX as usize) as u16).to_be_bytes());
    } else if v >= 13 {
        out.push((v - 13) as u8);
    }
}

fn nibble(v: usize) -> u8 {
    if v >= 269 {
        14
    } else if v >= 13 {
        13
    } else {
        v as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::coap::Message;
    use proptest::prelude::*;

    #[test]
    fn request_with_numeric_path_and_uints() {
        let m = MessageBuilder::request(Code::GET, true)
            .mid(0x1234)
            .token(&[1, 2, 3, 4])
            .observe(0)
            .path_id(3303)
            .path_id(0)
            .path_id(5700)
            .accept(11542)
            .to_vec();
        let d = Message::decode(&m).unwrap();
        assert_eq!(d.mtype, MsgType::Con);
        assert_eq!(d.message_id, 0x1234);
        assert!(d.path_is(&["3303", "0", "5700"]));
        assert_eq!(d.observe(), Some(0));
        assert_eq!(d.accept(), Some(11542));
        assert_eq!(
            MessageBuilder::request(Code::GET, true)
                .mid(0x1234)
                .token(&[1, 2, 3, 4])
                .observe(0)
                .path("/3303/0/5700")
                .accept(11542)
                .to_vec(),
            m
        );
    }

    #[test]
    fn empty_and_response() {
        assert_eq!(
            MessageBuilder::empty(MsgType::Rst, 0xabcd).to_vec(),
            vec![0x70, 0, 0xab, 0xcd]
        );
        let r = MessageBuilder::response_to(MsgType::Con, 7, Code::CREATED)
            .token(&[9])
            .location_segment(b"rd")
            .location_segment(b"00abcdef")
            .to_vec();
        let d = Message::decode(&r).unwrap();
        assert_eq!(
            (d.mtype, d.code, d.message_id),
            (MsgType::Ack, Code::CREATED, 7)
        );
        let segs: Vec<&[u8]> = d.location_path().collect();
        assert_eq!(segs, vec![&b"rd"[..], &b"00abcdef"[..]]);
    }

    proptest! {
        #[test]
        fn encoded_len_matches_and_decodes(
            ids in proptest::collection::vec(0u16..=65535, 0..5),
            q in proptest::collection::vec("[a-z]{1,300}", 0..3),
            cf in proptest::option::of(0u16..=65535),
            payload in proptest::collection::vec(any::<u8>(), 0..50),
        ) {
            let mut b = MessageBuilder::request(Code::POST, false).mid(1).token(&[7; 8]);
            for id in &ids { b = b.path_id(*id); }
            for x in &q { b = b.query(x); }
            if let Some(c) = cf { b = b.content_format(c); }
            let b = b.payload(&payload);
            let v = b.to_vec();
            prop_assert_eq!(v.len(), b.encoded_len());
            let m = Message::decode(&v).unwrap();
            let path: Vec<String> = m.uri_path().map(|s| String::from_utf8(s.to_vec()).unwrap()).collect();
            prop_assert_eq!(path, ids.iter().map(|i| i.to_string()).collect::<Vec<_>>());
            let qs: Vec<String> = m.uri_query().map(|s| String::from_utf8(s.to_vec()).unwrap()).collect();
            prop_assert_eq!(qs, q.clone());
            prop_assert_eq!(m.content_format(), cf);
            prop_assert_eq!(m.payload, &payload[..]);
        }
    }
}
