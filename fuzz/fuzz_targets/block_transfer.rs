//! Block-wise transfer state (RFC 7959) fed arbitrary block options and
//! payloads: never panics, never holds more than its bound.
#![no_main]
use corem_lwm2m::proto::coap::block::{
    block2_slice, Block1Limits, Block1Table, Block1Upload, Block2Assembly,
};
use corem_lwm2m::proto::coap::{Block, PeerId};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut table = Block1Table::new(Block1Limits {
        max_body: 4096,
        max_assemblies: 4,
        lifetime: Duration::from_secs(5),
    });
    let mut asm = Block2Assembly::new(4096);
    let mut up = Block1Upload::new(data.to_vec().into(), 6);
    let mut rest = data;
    let mut step = 0u64;
    while rest.len() >= 5 {
        let v = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]);
        let n = (rest[3] as usize).min(rest.len() - 4);
        let payload = &rest[4..4 + n];
        rest = &rest[4 + n..];
        step += 1;
        let now = t0 + Duration::from_millis(step * 100);
        let Some(b) = Block::decode(v) else { continue };
        let peer = PeerId::udp(([10, 0, 0, 1], (v & 3) as u16 + 1).into());
        let _ = table.handle(now, peer, (v >> 2 & 1) as u64, b, None, payload);
        let _ = asm.feed(b, None, payload);
        assert!(asm.len() <= 4096);
        let _ = up.on_continue(Some(b));
        let _ = up.on_too_large(Some(b), Some(v));
        let _ = up.current();
        let _ = block2_slice(v as usize, Some(b), (v % 8) as u8);
        if step % 7 == 0 {
            table.sweep(now);
        }
    }
    assert!(table.len() <= 4);
    assert!(table.bytes() <= 4 * 8192);
});
