//! Every LwM2M content-format decoder (text, opaque, CBOR, TLV, SenML
//! JSON/CBOR, LwM2M JSON) must be total. The first byte picks the format and
//! the base path depth.
#![no_main]
use corem_lwm2m::proto::lwm2m::content::{self, ResourcePath};
use corem_lwm2m::proto::cbor;
use corem_lwm2m::proto::lwm2m::registration;
use libfuzzer_sys::fuzz_target;

const FORMATS: [u16; 7] = [0, 42, 60, 110, 112, 11542, 11543];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let cf = FORMATS[(sel as usize) % FORMATS.len()];
    let base = match sel >> 4 {
        0..=4 => ResourcePath::parse("/3303").unwrap(),
        5..=9 => ResourcePath::parse("/3303/0").unwrap(),
        _ => ResourcePath::parse("/3303/0/5700").unwrap(),
    };
    if let Ok(vals) = content::decode(cf, base, rest, 1_700_000_000_000) {
        for v in vals {
            let _ = v.value.to_number(None);
            let _ = v.value.to_bool();
            let _ = v.value.to_string_value();
        }
    }
    let _ = cbor::decode(rest);
    let _ = registration::parse_register(rest.split(|b| *b == b'&'));
    let _ = registration::parse_location(rest);
});
