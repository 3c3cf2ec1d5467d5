//! Firmware updates driven by the network: `firmware_update` params and
//! campaign bodies (HTTP / Kafka), then the object 5 walk fed arbitrary
//! device answers, notifications, progress and presence. Never panics, asks
//! for at most one operation at a time, and always ends (outcome once)
//! within a bounded number of inputs when the device keeps failing.
#![no_main]
use corem_lwm2m::control::campaign::CampaignSpec;
use corem_lwm2m::proto::lwm2m::firmware::*;
use corem_lwm2m::proto::lwm2m::rpc::{RpcOutcome, RpcStatus};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (body, script) = data.split_at(split);
    if let Ok(spec) = serde_json::from_slice::<CampaignSpec>(body) {
        let _ = spec.validate();
        let _ = FirmwareParams::parse(&spec.params());
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return };
    let Ok(params) = FirmwareParams::parse(&v) else { return };
    let image = params.image.as_ref().map(|n| ImageRef {
        name: Arc::from(n.as_str()),
        version: "1".into(),
        sha256: String::new(),
        image: FwImage::new(Arc::from(vec![0u8; 4096]), &[0u8; 32]),
    });
    let plan = FirmwarePlan { params, image };
    let bases = UriBases {
        coap: Some("coap://127.0.0.1:5683".into()),
        coaps: None,
    };
    let Ok(mut j) = FirmwareUpdate::start(0, plan, "r0", script.first() == Some(&1), &bases, 1000)
    else {
        return;
    };
    let mut now = 0i64;
    let mut out = false;
    let mut ended = 0;
    for (i, b) in script.iter().enumerate() {
        now += 100;
        if j.poll_op().is_some() {
            assert!(!out, "two operations out at once");
            out = true;
        }
        let code = ["2.04", "2.05", "4.04", "4.05", "5.00"][(*b as usize) % 5];
        match b >> 4 {
            0..=5 if out => {
                out = false;
                let ok = code.starts_with('2');
                j.handle_done(
                    now,
                    &RpcOutcome {
                        status: if ok { RpcStatus::Succeeded } else { RpcStatus::Failed },
                        code: Some(code.into()),
                        response: Some(serde_json::json!({
                            "/5/0/3": b % 4, "/5/0/5": (b / 4) % 11, "/3/0/3": "x"
                        })),
                        reason: None,
                    },
                );
            }
            6 | 7 if out => {
                out = false;
                if b & 1 == 0 {
                    j.handle_done(now, &RpcOutcome::failed("the device registered again"));
                } else {
                    j.handle_returned();
                }
            }
            8 | 9 => j.handle_values(now, &serde_json::json!({ "/5/0/3": b % 4, "/5/0/5": (b / 4) % 11 })),
            10 => j.handle_progress(now, (*b as u64) * 100),
            11 => j.handle_presence(now, &format!("r{i}"), b & 1 == 0),
            12 => j.handle_timeout(now + 10_000),
            _ => {}
        }
        while let Some(s) = j.poll_status() {
            assert!(!s.status.is_terminal());
        }
        if let Some(o) = j.poll_outcome() {
            assert!(o.status.is_terminal());
            ended += 1;
        }
    }
    assert!(ended <= 1, "one outcome");
    let _ = j.timed_out();
});
