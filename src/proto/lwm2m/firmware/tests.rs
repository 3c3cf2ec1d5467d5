use super::*;
use serde_json::json;

fn image() -> ImageRef {
    let bytes: Arc<[u8]> = Arc::from(vec![7u8; 10_000]);
    ImageRef {
        name: Arc::from("fw-2"),
        version: "2.0".into(),
        sha256: "00".repeat(32),
        image: FwImage::new(bytes, &[0u8; 32]),
    }
}

fn plan(delivery: Delivery) -> FirmwarePlan {
    FirmwarePlan {
        params: FirmwareParams {
            image: Some("fw-2".into()),
            delivery,
            scheme: None,
            uri: None,
        },
        image: Some(image()),
    }
}

fn bases() -> UriBases {
    UriBases {
        coap: Some("coap://10.0.0.1:5683".into()),
        coaps: Some("coaps://10.0.0.1:5684".into()),
    }
}

fn answered(code: &str, response: Option<J>) -> RpcOutcome {
    RpcOutcome {
        status: if code.starts_with('2') {
            RpcStatus::Succeeded
        } else {
            RpcStatus::Failed
        },
        code: Some(code.into()),
        response,
        reason: None,
    }
}

fn lost() -> RpcOutcome {
    RpcOutcome::failed("the device registered again before it answered")
}

fn state(n: u8) -> J {
    json!({ "/5/0/3": n })
}

fn result(n: u8) -> J {
    json!({ "/5/0/5": n })
}

/// Answers the two observations the job starts with.
fn prepared(j: &mut FirmwareUpdate, st: u8, res: u8) {
    assert_eq!(
        j.poll_op(),
        Some(Op::Observe {
            path: STATE,
            format: None
        })
    );
    j.handle_done(0, &answered("2.05", Some(state(st))));
    assert_eq!(
        j.poll_op(),
        Some(Op::Observe {
            path: RESULT,
            format: None
        })
    );
    j.handle_done(0, &answered("2.05", Some(result(res))));
}

fn statuses(j: &mut FirmwareUpdate) -> Vec<RpcStatus> {
    std::iter::from_fn(|| j.poll_status())
        .map(|p| p.status)
        .collect()
}

#[test]
fn params_are_checked() {
    let p = FirmwareParams::parse(&json!({"image": "a"})).unwrap();
    assert_eq!(p.delivery, Delivery::Pull);
    assert_eq!(p.scheme, None);
    let p = FirmwareParams::parse(&json!({"image": "a", "method": "push"})).unwrap();
    assert_eq!(p.delivery, Delivery::Push);
    let p = FirmwareParams::parse(&json!({"image": "a", "protocol": "coaps"})).unwrap();
    assert_eq!(p.scheme, Some(Scheme::Coaps));
    let p = FirmwareParams::parse(&json!({"protocol": "https://cdn.example/fw.bin"})).unwrap();
    assert_eq!(p.uri.as_deref(), Some("https://cdn.example/fw.bin"));
    assert_eq!(p.image, None);
    for bad in [
        json!({}),
        json!({"image": 3}),
        json!({"image": "a", "method": "fax"}),
        json!({"image": "a", "protocol": "ftp"}),
        json!({"uri": "ftp://x/y"}),
        json!({"uri": "coap://"}),
        json!({"uri": "coap://a b"}),
        json!({"image": "a", "method": "push", "uri": "coap://x/y"}),
        json!({"uri": format!("coap://{}", "x".repeat(2000))}),
        json!({"uri": "coap://a/b", "protocol": "coap://c/d"}),
    ] {
        assert!(FirmwareParams::parse(&bad).is_err(), "{bad}");
    }
}

#[test]
fn pull_walks_to_success_and_reports_the_new_version() {
    let mut j =
        FirmwareUpdate::start(0, plan(Delivery::Pull), "r1", false, &bases(), 30_000).unwrap();
    assert_eq!(j.package_uri(), Some("coap://10.0.0.1:5683/fw/fw-2"));
    // A result left from an earlier update means nothing before delivery.
    prepared(&mut j, 0, 1);
    assert_eq!(j.phase(), Phase::Delivering);
    let Some(Op::Write { path, entries, .. }) = j.poll_op() else {
        panic!("URI write expected")
    };
    assert_eq!(path, PACKAGE_URI);
    assert_eq!(
        entries[0].value,
        WriteValue::Str("coap://10.0.0.1:5683/fw/fw-2".into())
    );
    // One operation at a time.
    assert_eq!(j.poll_op(), None);
    j.handle_done(1, &answered("2.04", None));
    assert_eq!(j.phase(), Phase::Downloading);
    j.handle_values(2, &json!({"/5/0/3": 1, "/5/0/5": 0}));
    j.handle_progress(3, 5_000);
    j.handle_progress(4, 5_500); // less than 10 points later: not published
    j.handle_progress(5, 10_000);
    let st: Vec<_> = std::iter::from_fn(|| j.poll_status()).collect();
    assert_eq!(st.len(), 3);
    assert_eq!(st[1].progress["percent"], 50);
    assert_eq!(st[2].progress["bytes"], 10_000);
    assert_eq!(st[2].progress["size"], 10_000);
    j.handle_values(6, &state(2));
    assert_eq!(statuses(&mut j), vec![RpcStatus::Downloaded]);
    assert_eq!(
        j.poll_op(),
        Some(Op::Execute {
            path: UPDATE,
            args: None
        })
    );
    j.handle_done(7, &answered("2.04", None));
    assert_eq!(statuses(&mut j), vec![RpcStatus::Updating]);
    // The device reboots: a new registration, observations set up again.
    j.handle_presence(8, "r2", true);
    prepared(&mut j, 0, 1);
    assert_eq!(
        j.poll_op(),
        Some(Op::Read {
            path: FIRMWARE_VERSION,
            format: None
        })
    );
    j.handle_done(9, &answered("2.05", Some(json!({"/3/0/3": "2.0"}))));
    // Observations on the device are cancelled before the RPC ends.
    assert_eq!(j.poll_op(), Some(Op::CancelObserve { path: STATE }));
    assert!(j.poll_outcome().is_none());
    j.handle_done(10, &answered("2.05", None));
    assert_eq!(j.poll_op(), Some(Op::CancelObserve { path: RESULT }));
    j.handle_done(11, &lost());
    let o = j.poll_outcome().unwrap();
    assert_eq!(o.status, RpcStatus::Succeeded);
    let r = o.response.unwrap();
    assert_eq!(r["firmware_version"], "2.0");
    assert_eq!(r["update_result"], 1);
    assert_eq!(r["image"], "fw-2");
    assert_eq!(j.phase(), Phase::Done);
    assert_eq!(j.poll_op(), None);
}

#[test]
fn push_writes_the_package_and_restarts_a_bounded_number_of_times() {
    let mut j =
        FirmwareUpdate::start(0, plan(Delivery::Push), "r1", true, &bases(), 30_000).unwrap();
    assert_eq!(j.package_uri(), None);
    prepared(&mut j, 0, 0);
    for i in 0..MAX_PUSH_RESTARTS {
        let Some(Op::WritePackage { path, package }) = j.poll_op() else {
            panic!("package write expected")
        };
        assert_eq!(path, PACKAGE);
        assert_eq!(package.0.len(), 10_000);
        j.handle_progress(1, 4_096);
        // The device re-registered under it: the push starts again.
        j.handle_done(2, &lost());
        j.handle_presence(3, &format!("r{}", i + 2), true);
        prepared(&mut j, 0, 0);
    }
    assert!(matches!(j.poll_op(), Some(Op::WritePackage { .. })));
    j.handle_done(4, &lost());
    // Re-observing first, then it gives up.
    let o = std::iter::from_fn(|| {
        j.poll_op()?;
        j.handle_done(5, &answered("2.05", Some(state(0))));
        Some(())
    })
    .count();
    assert!(o <= 2);
    let o = j.poll_outcome().expect("ended");
    assert_eq!(o.status, RpcStatus::Failed);
    assert!(o.reason.unwrap().contains("interrupted"));
}

#[test]
fn push_then_state_read_then_update() {
    let mut j =
        FirmwareUpdate::start(0, plan(Delivery::Push), "r1", false, &bases(), 30_000).unwrap();
    prepared(&mut j, 0, 0);
    assert!(matches!(j.poll_op(), Some(Op::WritePackage { .. })));
    j.handle_done(1, &answered("2.04", None));
    // A read of /5/0 follows the push (the notification may be lost).
    assert_eq!(
        j.poll_op(),
        Some(Op::Read {
            path: ResourcePath::instance(5, 0),
            format: None
        })
    );
    j.handle_done(
        2,
        &answered("2.05", Some(json!({"/5/0/3": 2, "/5/0/5": 0}))),
    );
    assert_eq!(
        statuses(&mut j),
        vec![RpcStatus::Downloading, RpcStatus::Downloaded]
    );
    assert!(matches!(j.poll_op(), Some(Op::Execute { .. })));
}

#[test]
fn update_result_errors_fail_with_their_meaning() {
    let mut j =
        FirmwareUpdate::start(0, plan(Delivery::Pull), "r1", false, &bases(), 30_000).unwrap();
    prepared(&mut j, 0, 0);
    j.poll_op();
    j.handle_done(1, &answered("2.04", None));
    j.handle_values(2, &json!({"/5/0/3": 0, "/5/0/5": 5}));
    // The observations are cancelled, then the failure is reported.
    while j.poll_op().is_some() {
        j.handle_done(3, &answered("2.05", None));
    }
    let o = j.poll_outcome().unwrap();
    assert_eq!(o.status, RpcStatus::Failed);
    assert_eq!(o.response.unwrap()["update_result"], 5);
    assert_eq!(
        o.reason.as_deref(),
        Some("Update Result 5: integrity check failure for the new downloaded package")
    );
}

#[test]
fn a_leftover_download_is_reset_and_an_update_in_progress_left_alone() {
    let mut j =
        FirmwareUpdate::start(0, plan(Delivery::Pull), "r1", false, &bases(), 30_000).unwrap();
    prepared(&mut j, 2, 0);
    let Some(Op::Write { entries, .. }) = j.poll_op() else {
        panic!()
    };
    assert_eq!(entries[0].value, WriteValue::Str(String::new()));
    j.handle_done(1, &answered("2.04", None));
    let Some(Op::Write { entries, .. }) = j.poll_op() else {
        panic!()
    };
    assert_eq!(
        entries[0].value,
        WriteValue::Str("coap://10.0.0.1:5683/fw/fw-2".into())
    );

    let mut j =
        FirmwareUpdate::start(0, plan(Delivery::Pull), "r1", false, &bases(), 30_000).unwrap();
    prepared(&mut j, 3, 0);
    while j.poll_op().is_some() {
        j.handle_done(1, &answered("2.05", None));
    }
    let o = j.poll_outcome().unwrap();
    assert!(o.reason.unwrap().contains("already updating"));
}

#[test]
fn without_object_5_or_observe() {
    let mut j =
        FirmwareUpdate::start(0, plan(Delivery::Pull), "r1", false, &bases(), 30_000).unwrap();
    j.poll_op();
    j.handle_done(0, &answered("4.04", None));
    assert_eq!(j.poll_op(), None);
    let o = j.poll_outcome().unwrap();
    assert_eq!(o.code.as_deref(), Some("4.04"));
    assert!(o.reason.unwrap().contains("no Firmware Update object"));

    // Observe refused: /5/0 is read instead, and again when nothing
    // happened for poll_ms.
    let mut j =
        FirmwareUpdate::start(0, plan(Delivery::Pull), "r1", false, &bases(), 1_000).unwrap();
    j.poll_op();
    j.handle_done(0, &answered("4.05", None));
    j.poll_op();
    j.handle_done(0, &answered("4.05", None));
    let read = Op::Read {
        path: ResourcePath::instance(5, 0),
        format: None,
    };
    assert_eq!(j.poll_op(), Some(read.clone()));
    j.handle_done(
        0,
        &answered("2.05", Some(json!({"/5/0/3": 0, "/5/0/5": 0}))),
    );
    assert!(matches!(j.poll_op(), Some(Op::Write { .. })));
    j.handle_done(10, &answered("2.04", None));
    assert_eq!(j.poll_timeout(), Some(1_010));
    j.handle_timeout(500);
    assert_eq!(j.poll_op(), None);
    j.handle_timeout(1_010);
    assert_eq!(j.poll_op(), Some(read));
    j.handle_done(1_020, &answered("2.05", Some(state(2))));
    assert!(matches!(j.poll_op(), Some(Op::Execute { .. })));
}

#[test]
fn uri_schemes_and_timeouts() {
    let j = FirmwareUpdate::start(0, plan(Delivery::Pull), "r1", true, &bases(), 30_000).unwrap();
    assert_eq!(j.package_uri(), Some("coaps://10.0.0.1:5684/fw/fw-2"));
    let mut p = plan(Delivery::Pull);
    p.params.scheme = Some(Scheme::Coap);
    let j = FirmwareUpdate::start(0, p, "r1", true, &bases(), 30_000).unwrap();
    assert_eq!(j.package_uri(), Some("coap://10.0.0.1:5683/fw/fw-2"));
    let e = FirmwareUpdate::start(0, plan(Delivery::Pull), "r1", true, &UriBases::default(), 1)
        .unwrap_err();
    assert!(e.contains("firmware.coaps_uri"), "{e}");
    let p = FirmwarePlan {
        params: FirmwareParams::parse(&json!({"uri": "https://cdn/x.bin"})).unwrap(),
        image: None,
    };
    assert!(p.served_image().is_none());
    let mut j = FirmwareUpdate::start(0, p, "r1", false, &UriBases::default(), 1).unwrap();
    assert_eq!(j.package_uri(), Some("https://cdn/x.bin"));
    prepared(&mut j, 0, 0);
    j.poll_op();
    j.handle_done(1, &answered("2.04", None));
    let o = j.timed_out();
    assert_eq!(o.status, RpcStatus::TimedOut);
    assert!(o.reason.unwrap().contains("downloading"));
    // A push's package is not served.
    assert!(plan(Delivery::Push).served_image().is_none());
    assert!(plan(Delivery::Pull).served_image().is_some());
}

#[test]
fn a_silent_device_runs_out_of_interruptions() {
    let mut j =
        FirmwareUpdate::start(0, plan(Delivery::Pull), "r1", false, &bases(), 30_000).unwrap();
    let timeout = RpcOutcome {
        status: RpcStatus::TimedOut,
        code: None,
        response: None,
        reason: Some("no answer from the device after the CoAP retransmissions".into()),
    };
    let mut n = 0;
    while j.poll_op().is_some() {
        j.handle_done(n, &timeout);
        n += 1;
        assert!(n < 100);
    }
    let o = j.poll_outcome().unwrap();
    assert_eq!(o.status, RpcStatus::TimedOut);
    assert_eq!(n as u32, MAX_INTERRUPTIONS + 1);
}
