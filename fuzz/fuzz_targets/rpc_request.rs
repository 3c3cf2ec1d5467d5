//! RPC requests from the network (Kafka record values, HTTP bodies):
//! parsing, validation, method resolution through the built-in profile,
//! the CoAP request for the operation and the interpretation of an
//! arbitrary answer never panic.
#![no_main]
use corem_lwm2m::control::profiles::Profile;
use corem_lwm2m::proto::coap::Code;
use corem_lwm2m::proto::lwm2m::dm::interpret;
use corem_lwm2m::proto::lwm2m::registration::Version;
use corem_lwm2m::proto::lwm2m::rpc::{resolve, RpcRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (body, answer) = data.split_at(split);
    let Ok(req) = RpcRequest::parse(body) else { return };
    let _ = req.validate();
    let profile = Profile::builtin_default();
    let Ok(op) = resolve(&req.method, &req.params, Some(&profile)) else { return };
    for v in [Version::V1_0, Version::V1_1] {
        let _ = op.request(v, None);
    }
    let cf = answer.first().map(|b| match b % 6 {
        0 => 0,
        1 => 42,
        2 => 60,
        3 => 110,
        4 => 112,
        _ => 11542,
    });
    let types = |_: &corem_lwm2m::proto::lwm2m::content::ResourcePath| None;
    let _ = interpret(&op, Code::CONTENT, cf, answer, &[b"1", b"2"], 0, &types);
});
