//! Admin API requests (method, path with its query, body) through the
//! routes against an in-memory directory: path and query decoding,
//! provisioning bodies, device listing and paging, RPC bodies (no RPC
//! service: 503), live-telemetry queries against a closed tap (polls answer
//! at once), never panic, and every reply is well-formed.
#![no_main]
use corem_lwm2m::control::admin::routes::{route, AdminState, ApiRequest};
use corem_lwm2m::control::directory::Directory;
use corem_lwm2m::control::profiles::Profiles;
use corem_lwm2m::proto::lwm2m::endpoint::EndpointEntry;
use corem_lwm2m::sink::tap::Tap;
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
        tap: Some({
            // Closed: a long poll answers at once instead of stalling the
            // fuzzer for `wait_ms`.
            let t = Arc::new(Tap::default());
            t.close();
            t
        }),
    })
}

/// A device the telemetry, RPC and device routes can find (the input may
/// have deleted it in an earlier run).
const EP: &str = "urn:fuzz:1";

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
    let st = state();
    if st.directory.get(EP).is_none() {
        let _ = st
            .directory
            .upsert(EP, EndpointEntry::new("d1", "t1", "environment"));
    }
    let r = route(st, &req);
    assert!((200..600).contains(&r.status));
    if r.status >= 400 {
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON error");
        assert!(v["code"].is_string() && v["message"].is_string());
    }
});
