//! CoAP message decoding and option iteration must never panic.
#![no_main]
use corem_lwm2m::proto::coap::{Header, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Header::peek(data);
    if let Ok(m) = Message::decode(data) {
        for o in m.options() {
            let _ = o.as_uint();
            let _ = o.as_str();
        }
        let _ = m.unknown_critical_option();
        let _ = m.content_format();
        let _ = m.observe();
        let _ = m.path_is(&["rd"]);
    }
});
