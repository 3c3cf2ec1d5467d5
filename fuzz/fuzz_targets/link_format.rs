//! The RFC 6690 registration payload parser must be total.
#![no_main]
use corem_lwm2m::proto::lwm2m::link_format::parse_registration;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(l) = parse_registration(data) {
        let _ = l.has(3, Some(0));
    }
});
