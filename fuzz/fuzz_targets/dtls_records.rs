//! DTLS record walk, ClientHello view, cookie check and record opening on
//! arbitrary datagrams: never panics, never reads past the input.
#![no_main]
use corem_lwm2m::proto::dtls::cipher::{Keys, RecordCipher, Side, Suite};
use corem_lwm2m::proto::dtls::cookie::CookieJar;
use corem_lwm2m::proto::dtls::{handshake, record};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let mut total = 0;
    for r in record::records(data) {
        match r {
            Ok(r) => total += record::HEADER_LEN + r.fragment.len(),
            Err(_) => break,
        }
    }
    assert!(total <= data.len());
    let jar = CookieJar::new(Instant::now(), [1; 32], Duration::from_secs(60));
    if let Ok(h) = handshake::client_hello(data) {
        let peer = "10.0.0.1:1".parse().unwrap();
        let _ = jar.verify(peer, &h);
        let mut out = Vec::new();
        handshake::write_hello_verify_request(&mut out, &h, &jar.cookie(peer, &h));
        assert!(out.len() <= data.len());
    }
    if data.len() > record::HEADER_LEN {
        let suite = Suite::ALL[data[0] as usize % Suite::ALL.len()];
        let keys = Keys::derive(suite, &[0; 48], &[0; 32], &[0; 32]);
        let mut c = RecordCipher::new().unwrap();
        let header: [u8; 13] = data[..13].try_into().unwrap();
        let mut frag = data[13..].to_vec();
        if let Ok(r) = c.open(&keys, Side::Client, &header, &mut frag) {
            assert!(r.end <= frag.len());
        }
    }
});
