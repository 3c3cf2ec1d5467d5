//! Admin API requests (method, path with its query, body) through the
//! routes against an in-memory directory: path and query decoding,
//! provisioning bodies, device listing and paging, RPC bodies (no RPC
//! service: 503), never panic, and every reply is well-formed.
#![no_main]
use corem_lwm2m::control::admin::routes::{route, AdminState, ApiRequest};
use corem_lwm2m::control::directory::Directory;
use corem_lwm2m::control::profiles::Profiles;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

fn state() -> &'static AdminState {
    static ST: OnceLock<AdminState> = OnceLock::new();
    ST.get_or_init(|| AdminState {
        directory: Arc::new(Directory::default()),
        profiles: Arc::new(Profiles::load(None).expect("built-in profiles")),
        metrics: Vec::new(),
        snapshot_dir: std::env::temp_dir().join("corem-fuzz-admin"),
        on_tenants: None,
        on_endpoints: None,
        on_profiles: None,
        rpc: None,
        control: None,
        counters: None,
        firmware: None,
        firmware_upload_timeout: std::time::Duration::from_secs(1),
        tap: None,
    })
}

const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "PATCH"];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let split = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let (target, body) = rest.split_at(split);
    let target = String::from_utf8_lossy(target);
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    // Snapshots would write files: not this route.
    if path == "/v1/snapshot" {
        return;
    }
    let req = ApiRequest {
        method: METHODS[m as usize % METHODS.len()].to_string(),
        path: path.to_string(),
        query: query.to_string(),
        body: bytes::Bytes::copy_from_slice(body.get(1..).unwrap_or(&[])),
    };
    let r = route(state(), &req);
    assert!((200..600).contains(&r.status));
    if r.status >= 400 {
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON error");
        assert!(v["code"].is_string() && v["message"].is_string());
    }
});
