//! Block-wise transfers (RFC 7959), sans-IO: the state of one body moving in
//! blocks, in each of the four roles the gateway plays.
//!
//! * [`Block2Assembly`]: a response from a device arriving in Block2 blocks
//!   (our Read of a large resource). Blocks must come in order; the body is
//!   bounded; an ETag change restarts nothing but fails the transfer (§2.4:
//!   the representation changed under us).
//! * [`Block1Upload`]: a request body we send in Block1 blocks (a large
//!   Write). The device may answer 2.31 with a smaller SZX (§2.3: later
//!   blocks use it, the block number is recomputed from the byte offset) or
//!   4.13 with a Block1 / Size1 hint (§2.9.3: we start again, smaller).
//! * [`Block1Table`]: request bodies arriving in Block1 blocks (Register,
//!   Send), per peer and request, bounded in size, number and age; a body
//!   above the maximum gets 4.13 with Size1 (§2.9.3), a gap 4.08 (§2.9.2).
//! * [`block2_slice`]: serving a gateway resource in Block2 blocks (firmware
//!   images), any block number on request, so a transfer can resume.
//!
//! Block sizes are 2^(SZX+4), SZX 0..=6 (16..=1024 bytes, §2.2).

use super::codec::Block;
use super::peer::PeerId;
use crate::proto::FastMap;
use smallvec::SmallVec;
use std::time::{Duration, Instant};

/// Largest SZX (1024-byte blocks, RFC 7959 §2.2).
pub const MAX_SZX: u8 = 6;

/// The largest SZX whose block fits in `bytes` (at least 0: 16 bytes).
pub fn szx_for(bytes: usize) -> u8 {
    let mut szx = 0u8;
    while szx < MAX_SZX && (32usize << szx) <= bytes {
        szx += 1;
    }
    szx
}

pub fn block_size(szx: u8) -> usize {
    16usize << szx.min(MAX_SZX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("block {got} where block {want} was expected")]
    OutOfOrder { got: u32, want: u32 },
    #[error("the representation changed during the transfer (ETag)")]
    EtagChanged,
    #[error("block size changed mid-transfer in a way the offset cannot follow")]
    BadSize,
    #[error("the peer refused every block size down to 16 bytes")]
    NoSmallerSize,
}

// ---------------------------------------------------------------- Block2 in

/// A response body arriving in Block2 blocks.
#[derive(Debug)]
pub struct Block2Assembly {
    body: Vec<u8>,
    max: usize,
    etag: Option<SmallVec<[u8; 8]>>,
}

impl Block2Assembly {
    pub fn new(max: usize) -> Block2Assembly {
        Block2Assembly {
            body: Vec::new(),
            max,
            etag: None,
        }
    }

    /// One response carrying `block` (its Block2 option), `etag` and
    /// `payload`. `Ok(Some(next))`: ask for `next`; `Ok(None)`: the body is
    /// complete.
    pub fn feed(
        &mut self,
        block: Block,
        etag: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<Option<Block>, BlockError> {
        let size = block.size();
        let offset = block.num as usize * size;
        if offset != self.body.len() {
            return Err(BlockError::OutOfOrder {
                got: block.num,
                want: (self.body.len() / size) as u32,
            });
        }
        // §2.2: every block but the last carries exactly 2^(SZX+4) bytes.
        if block.more && payload.len() != size {
            return Err(BlockError::BadSize);
        }
        match (&self.etag, etag) {
            (None, Some(e)) if self.body.is_empty() => self.etag = Some(SmallVec::from_slice(e)),
            (Some(a), Some(b)) if a.as_slice() != b => return Err(BlockError::EtagChanged),
            (Some(_), None) => return Err(BlockError::EtagChanged),
            _ => {}
        }
        if self.body.len() + payload.len() > self.max {
            return Err(BlockError::TooLarge(self.max));
        }
        self.body.extend_from_slice(payload);
        if !block.more {
            return Ok(None);
        }
        Ok(Some(Block {
            num: block.num + 1,
            more: false,
            szx: block.szx,
        }))
    }

    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    pub fn into_body(self) -> Vec<u8> {
        self.body
    }
}

// ---------------------------------------------------------------- Block1 out

/// A request body we send in Block1 blocks.
#[derive(Debug, Clone)]
pub struct Block1Upload {
    body: std::sync::Arc<[u8]>,
    /// Bytes the peer has accepted.
    offset: usize,
    szx: u8,
    /// Times the upload started again smaller (4.13).
    pub restarts: u32,
}

impl Block1Upload {
    pub fn new(body: std::sync::Arc<[u8]>, szx: u8) -> Block1Upload {
        Block1Upload {
            body,
            offset: 0,
            szx: szx.min(MAX_SZX),
            restarts: 0,
        }
    }

    /// True when the body fits in one block of `szx` (no Block1 needed).
    pub fn fits(len: usize, szx: u8) -> bool {
        len <= block_size(szx)
    }

    /// The block to send now: its option and its bytes.
    pub fn current(&self) -> (Block, &[u8]) {
        let size = block_size(self.szx);
        let end = (self.offset + size).min(self.body.len());
        (
            Block {
                num: (self.offset / size) as u32,
                more: end < self.body.len(),
                szx: self.szx,
            },
            &self.body[self.offset..end],
        )
    }

    pub fn szx(&self) -> u8 {
        self.szx
    }

    pub fn sent_bytes(&self) -> usize {
        self.offset
    }

    pub fn total(&self) -> usize {
        self.body.len()
    }

    /// Bytes before the current block (acknowledged by the peer).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The peer accepted the current block with 2.31 Continue (`ack` is the
    /// Block1 option of its response). Returns true when that was the last
    /// block. A smaller SZX in `ack` applies from the next block on
    /// (RFC 7959 §2.3).
    pub fn on_continue(&mut self, ack: Option<Block>) -> Result<bool, BlockError> {
        let (cur, bytes) = self.current();
        let n = bytes.len();
        if let Some(a) = ack {
            if a.num != cur.num {
                return Err(BlockError::OutOfOrder {
                    got: a.num,
                    want: cur.num,
                });
            }
        }
        self.offset += n;
        if let Some(a) = ack {
            if a.szx < self.szx {
                if self.offset % block_size(a.szx) != 0 {
                    return Err(BlockError::BadSize);
                }
                self.szx = a.szx;
            }
        }
        Ok(self.offset >= self.body.len())
    }

    /// The peer answered 4.13 Request Entity Too Large: start again with the
    /// size it asked for (its Block1 SZX, or the largest block within
    /// Size1), or half the current one (RFC 7959 §2.9.3).
    pub fn on_too_large(
        &mut self,
        hint: Option<Block>,
        size1: Option<u32>,
    ) -> Result<(), BlockError> {
        let wanted = match (hint, size1) {
            (Some(b), _) if b.szx < self.szx => b.szx,
            (_, Some(s)) if (s as usize) < block_size(self.szx) => szx_for(s as usize),
            _ => {
                if self.szx == 0 {
                    return Err(BlockError::NoSmallerSize);
                }
                self.szx - 1
            }
        };
        if wanted >= self.szx {
            return Err(BlockError::NoSmallerSize);
        }
        self.szx = wanted;
        self.offset = 0;
        self.restarts += 1;
        Ok(())
    }
}

// ---------------------------------------------------------------- Block1 in

/// Limits of [`Block1Table`].
#[derive(Debug, Clone)]
pub struct Block1Limits {
    /// Largest body accepted (Size1 of the 4.13).
    pub max_body: usize,
    /// Bodies being assembled at once (per shard).
    pub max_assemblies: usize,
    /// An assembly with no block for this long is dropped.
    pub lifetime: Duration,
}

impl Default for Block1Limits {
    fn default() -> Self {
        Block1Limits {
            max_body: 64 * 1024,
            max_assemblies: 1024,
            lifetime: Duration::from_secs(60),
        }
    }
}

/// The answer to one Block1 request.
#[derive(Debug, PartialEq, Eq)]
pub enum Block1Step {
    /// Reply 2.31 Continue with this Block1 option (§2.3).
    Continue(Block),
    /// The body is complete: process the request with it.
    Complete(Vec<u8>),
    /// Reply 4.13 with Size1 = `max_body` (§2.9.3); the state is gone.
    TooLarge,
    /// Reply 4.08 Request Entity Incomplete (§2.9.2): a block is missing.
    Incomplete,
    /// Too many bodies in progress: reply 5.03.
    Busy,
}

struct Assembly {
    body: Vec<u8>,
    szx: u8,
    last_block: Instant,
}

/// Request bodies arriving in Block1 blocks, keyed by peer and a digest of
/// the request (code, Uri-Path, Uri-Query: RFC 7959 §2.5 matches blocks of
/// one body by the request's options).
pub struct Block1Table {
    limits: Block1Limits,
    map: FastMap<(PeerId, u64), Assembly>,
    next_sweep: Option<Instant>,
}

impl Block1Table {
    pub fn new(limits: Block1Limits) -> Block1Table {
        Block1Table {
            limits,
            map: FastMap::default(),
            next_sweep: None,
        }
    }

    pub fn limits(&self) -> &Block1Limits {
        &self.limits
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// One block of a body from `peer`. `size1` is the client's announced
    /// total size, if any (checked up front, §2.5).
    pub fn handle(
        &mut self,
        now: Instant,
        peer: PeerId,
        key: u64,
        block: Block,
        size1: Option<u32>,
        payload: &[u8],
    ) -> Block1Step {
        let max = self.limits.max_body;
        if size1.is_some_and(|s| s as usize > max) {
            self.map.remove(&(peer, key));
            return Block1Step::TooLarge;
        }
        let size = block.size();
        if block.num == 0 {
            if !self.map.contains_key(&(peer, key)) && self.map.len() >= self.limits.max_assemblies
            {
                self.sweep(now);
                if self.map.len() >= self.limits.max_assemblies {
                    return Block1Step::Busy;
                }
            }
            self.map.insert(
                (peer, key),
                Assembly {
                    body: Vec::new(),
                    szx: block.szx,
                    last_block: now,
                },
            );
        }
        let Some(a) = self.map.get_mut(&(peer, key)) else {
            return Block1Step::Incomplete;
        };
        let offset = block.num as usize * size;
        if offset != a.body.len() || (block.more && payload.len() != size) {
            // A retransmission of the block before is answered again by
            // the exchange layer's duplicate cache; anything else is a gap.
            self.map.remove(&(peer, key));
            return Block1Step::Incomplete;
        }
        if a.body.len() + payload.len() > max {
            self.map.remove(&(peer, key));
            return Block1Step::TooLarge;
        }
        a.body.extend_from_slice(payload);
        a.last_block = now;
        a.szx = block.szx;
        if block.more {
            self.schedule(now);
            return Block1Step::Continue(Block {
                num: block.num,
                more: true,
                szx: block.szx,
            });
        }
        let body = self
            .map
            .remove(&(peer, key))
            .map(|a| a.body)
            .unwrap_or_default();
        Block1Step::Complete(body)
    }

    /// Drops what `peer` was sending (it went away).
    pub fn forget_peer(&mut self, peer: &PeerId) {
        self.map.retain(|(p, _), _| p != peer);
    }

    fn schedule(&mut self, now: Instant) {
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + self.limits.lifetime);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// Drops assemblies idle longer than the lifetime; returns how many.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let before = self.map.len();
        let life = self.limits.lifetime;
        self.map
            .retain(|_, a| now.duration_since(a.last_block) < life);
        self.next_sweep = (!self.map.is_empty()).then_some(now + life);
        before - self.map.len()
    }

    /// Bytes held by assemblies in progress.
    pub fn bytes(&self) -> usize {
        self.map.values().map(|a| a.body.capacity()).sum()
    }
}

// ---------------------------------------------------------------- Block2 out

/// Which bytes of a `len`-byte resource answer a request with Block2
/// option `requested` (none: the first block), in blocks of at most
/// `max_szx`: the range and the Block2 option of the response. `None` when
/// the block starts past the end (RFC 7959 §2.4: 4.02 Bad Option).
pub fn block2_slice(
    len: usize,
    requested: Option<Block>,
    max_szx: u8,
) -> Option<(std::ops::Range<usize>, Block)> {
    let (num, szx) = match requested {
        Some(b) => (b.num, b.szx.min(max_szx)),
        None => (0, max_szx.min(MAX_SZX)),
    };
    // The block number is in units of the requested size; a smaller size
    // of ours starts at the same byte offset (§2.4).
    let req_size = requested.map(|b| b.size()).unwrap_or(block_size(szx));
    let offset = num as usize * req_size;
    let size = block_size(szx);
    if offset > len || (offset == len && len > 0) {
        return None;
    }
    let end = (offset + size).min(len);
    Some((
        offset..end,
        Block {
            num: (offset / size) as u32,
            more: end < len,
            szx,
        },
    ))
}

/// A digest of a request's code, Uri-Path and Uri-Query (the Block1 key).
pub fn request_key<'a>(code: u8, parts: impl Iterator<Item = &'a [u8]>) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = foldhash::fast::FixedState::with_seed(0x5eed).build_hasher();
    h.write_u8(code);
    for p in parts {
        h.write_usize(p.len());
        h.write(p);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn b(num: u32, more: bool, szx: u8) -> Block {
        Block { num, more, szx }
    }

    #[test]
    fn sizes() {
        assert_eq!(szx_for(1024), 6);
        assert_eq!(szx_for(2000), 6);
        assert_eq!(szx_for(256), 4);
        assert_eq!(szx_for(300), 4);
        assert_eq!(szx_for(10), 0);
        assert_eq!(block_size(4), 256);
    }

    #[test]
    fn block2_reassembly_in_order_bounded() {
        let body: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut a = Block2Assembly::new(16 * 1024);
        let mut next = Some(b(0, false, 6));
        while let Some(req) = next {
            let (r, opt) = block2_slice(body.len(), Some(req), 6).unwrap();
            next = a.feed(opt, Some(b"e1"), &body[r]).unwrap();
        }
        assert_eq!(a.into_body(), body);
        // Too large.
        let mut a = Block2Assembly::new(1500);
        assert!(a.feed(b(0, true, 6), None, &body[..1024]).is_ok());
        assert_eq!(
            a.feed(b(1, true, 6), None, &body[1024..2048]),
            Err(BlockError::TooLarge(1500))
        );
        // Out of order and ETag change.
        let mut a = Block2Assembly::new(1 << 20);
        a.feed(b(0, true, 6), Some(b"x"), &body[..1024]).unwrap();
        assert!(matches!(
            a.feed(b(2, true, 6), Some(b"x"), &body[..1024]),
            Err(BlockError::OutOfOrder { .. })
        ));
        assert_eq!(
            a.feed(b(1, true, 6), Some(b"y"), &body[1024..2048]),
            Err(BlockError::EtagChanged)
        );
    }

    #[test]
    fn block1_upload_follows_a_smaller_size() {
        let body: Arc<[u8]> = (0..5000u32).map(|i| i as u8).collect::<Vec<_>>().into();
        let mut u = Block1Upload::new(body.clone(), 6);
        let mut got = Vec::new();
        let (blk, bytes) = u.current();
        assert_eq!((blk.num, blk.more, bytes.len()), (0, true, 1024));
        got.extend_from_slice(bytes);
        // The device accepts block 0 but asks for 256-byte blocks.
        assert!(!u.on_continue(Some(b(0, true, 4))).unwrap());
        loop {
            let (blk, bytes) = u.current();
            assert_eq!(blk.szx, 4);
            assert_eq!(blk.num as usize * 256, got.len());
            got.extend_from_slice(bytes);
            if u.on_continue(Some(b(blk.num, blk.more, 4))).unwrap() {
                break;
            }
        }
        assert_eq!(&got[..], &body[..]);
    }

    #[test]
    fn block1_upload_restarts_smaller_on_413() {
        let body: Arc<[u8]> = vec![7u8; 3000].into();
        let mut u = Block1Upload::new(body, 6);
        u.on_too_large(None, Some(512)).unwrap();
        assert_eq!((u.szx(), u.current().0.num, u.restarts), (5, 0, 1));
        u.on_too_large(Some(b(0, false, 2)), None).unwrap();
        assert_eq!(u.szx(), 2);
        u.on_too_large(None, None).unwrap();
        assert_eq!(u.szx(), 1);
        u.on_too_large(None, None).unwrap();
        assert_eq!(u.on_too_large(None, None), Err(BlockError::NoSmallerSize));
    }

    fn peer() -> PeerId {
        PeerId::udp(([10, 0, 0, 1], 5000).into())
    }

    #[test]
    fn block1_table_assembles_and_bounds() {
        let t0 = Instant::now();
        let mut t = Block1Table::new(Block1Limits {
            max_body: 3000,
            max_assemblies: 2,
            lifetime: Duration::from_secs(10),
        });
        let body = vec![1u8; 2100];
        assert_eq!(
            t.handle(t0, peer(), 1, b(0, true, 6), None, &body[..1024]),
            Block1Step::Continue(b(0, true, 6))
        );
        assert_eq!(
            t.handle(t0, peer(), 1, b(1, true, 6), None, &body[1024..2048]),
            Block1Step::Continue(b(1, true, 6))
        );
        assert_eq!(
            t.handle(t0, peer(), 1, b(2, false, 6), None, &body[2048..]),
            Block1Step::Complete(body.clone())
        );
        assert!(t.is_empty());
        // Over the maximum: 4.13, nothing kept.
        let big = vec![0u8; 1024];
        for n in 0..2 {
            t.handle(t0, peer(), 2, b(n, true, 6), None, &big);
        }
        assert_eq!(
            t.handle(t0, peer(), 2, b(2, true, 6), None, &big),
            Block1Step::TooLarge
        );
        assert!(t.is_empty());
        assert_eq!(
            t.handle(t0, peer(), 3, b(0, true, 6), Some(10_000), &big),
            Block1Step::TooLarge
        );
        // A gap: 4.08, state gone.
        t.handle(t0, peer(), 4, b(0, true, 6), None, &big);
        assert_eq!(
            t.handle(t0, peer(), 4, b(2, true, 6), None, &big),
            Block1Step::Incomplete
        );
        assert!(t.is_empty());
        // The number of assemblies is bounded; idle ones expire.
        t.handle(t0, peer(), 5, b(0, true, 6), None, &big);
        t.handle(t0, peer(), 6, b(0, true, 6), None, &big);
        assert_eq!(
            t.handle(t0, peer(), 7, b(0, true, 6), None, &big),
            Block1Step::Busy
        );
        assert_eq!(t.sweep(t0 + Duration::from_secs(11)), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn block2_serving_any_block() {
        let len = 2 * 1024 + 10;
        let (r, o) = block2_slice(len, None, 6).unwrap();
        assert_eq!((r, o), (0..1024, b(0, true, 6)));
        let (r, o) = block2_slice(len, Some(b(2, false, 6)), 6).unwrap();
        assert_eq!((r, o), (2048..2058, b(2, false, 6)));
        // The device asks for 256-byte blocks.
        let (r, o) = block2_slice(len, Some(b(5, false, 4)), 6).unwrap();
        assert_eq!((r, o), (1280..1536, b(5, true, 4)));
        // Our limit is smaller than the device's request: same offset.
        let (r, o) = block2_slice(len, Some(b(1, false, 6)), 4).unwrap();
        assert_eq!((r, o), (1024..1280, b(4, true, 4)));
        assert!(block2_slice(len, Some(b(3, false, 6)), 6).is_none());
        assert_eq!(block2_slice(0, None, 6).unwrap().0, 0..0);
    }
}
