//! Firmware updates over LwM2M object 5 (TS 1.1 Core §E.6), end to end
//! against the gateway binary with two shards and a real broker: the image
//! store behind the admin API (`PUT /v1/firmware/{name}` streamed and
//! checksum-verified, `GET`, `DELETE`, kept across restarts), and the
//! `firmware_update` RPC walking simulated devices through pull (the
//! gateway serves `/fw/{name}` in Block2) and push (Block1 writes of
//! /5/0/0), plain and over DTLS, with the statuses consumed back from
//! `device.rpc.status.acme`.

mod common;

use common::*;
use corem_lwm2m::proto::coap::Code;
use corem_lwm2m::proto::lwm2m::content::ResourcePath;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

const DEV: &str = "d7b1c0e2-3f44-4a91-9b2e-2c5a1f0e9d33";

fn upload(gw: &Gateway, name: &str, version: &str, img: &[u8]) {
    let (code, body) = http_bytes(
        gw.admin,
        "PUT",
        &format!(
            "/v1/firmware/{name}?version={version}&sha256={}",
            sha256_hex(img)
        ),
        "",
        img,
    )
    .unwrap();
    assert_eq!(code, 201, "{body}");
}

fn rpc(gw: &Gateway, device: &str, body: &str) -> String {
    let (code, b) = http(gw.admin, "POST", &format!("/v1/devices/{device}/rpc"), body).unwrap();
    assert_eq!(code, 202, "{b}");
    serde_json::from_str::<serde_json::Value>(&b).unwrap()["rpc_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn rpc_status(gw: &Gateway, id: &str) -> serde_json::Value {
    let (code, b) = http(gw.admin, "GET", &format!("/v1/rpc/{id}"), "").unwrap();
    assert_eq!(code, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

const TERMINAL: [&str; 4] = ["succeeded", "failed", "timed_out", "expired"];

/// Answers the gateway (the device downloads by itself) until the RPC
/// ends; `on_update` runs once when the device executes Update /5/0/2 (the
/// test reboots it there).
fn drive(
    gw: &Gateway,
    dev: &mut Device,
    id: &str,
    within: Duration,
    mut on_update: impl FnMut(&mut Device),
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    let mut last_poll = Instant::now();
    let mut updated = false;
    loop {
        let (ev, _) = dev.pump(Duration::from_millis(20));
        if !updated && ev.executed.contains(&ResourcePath::resource(5, 0, 2)) {
            updated = true;
            on_update(dev);
        }
        if last_poll.elapsed() > Duration::from_millis(200) {
            last_poll = Instant::now();
            let s = rpc_status(gw, id);
            if TERMINAL.contains(&s["status"].as_str().unwrap_or("")) {
                return s;
            }
            assert!(Instant::now() < deadline, "still {s}");
        }
    }
}

/// The statuses of `id` on the topic, in order.
fn statuses(
    broker: &Broker,
    r: &corem_lwm2m::tools::topic_reader::TopicReader,
    id: &str,
    device: &str,
) -> Vec<serde_json::Value> {
    broker.write_marker("device.rpc.status.acme");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let got = read_matching(r, 1, Duration::from_secs(2), |x| x.value["rpc_id"] == id);
        for x in got {
            assert_eq!(x.key.as_deref(), Some(device), "keyed by device_id");
            out.push(x.value);
        }
        if out
            .last()
            .is_some_and(|v| TERMINAL.contains(&v["status"].as_str().unwrap_or("")))
        {
            break;
        }
    }
    out
}

/// The status sequence with repeats folded (`downloading` comes several
/// times, with growing bytes).
fn folded(ev: &[serde_json::Value]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in ev {
        let s = e["status"].as_str().unwrap().to_string();
        if out.last() != Some(&s) {
            out.push(s);
        }
    }
    out
}

/// The device rebooted into `version`: registers again from a new port
/// (any shard may get it).
fn reboot_plain(version: &'static str) -> impl FnMut(&mut Device) {
    move |dev: &mut Device| {
        dev.sim.fw_reboot(version);
        dev.new_port();
        assert_eq!(dev.register(0), Code::CREATED);
    }
}

/// Checks a successful update: the walk on the topic in order, the bytes
/// growing to the image size, the image on the device byte-identical.
fn check_success(
    final_status: &serde_json::Value,
    events: &[serde_json::Value],
    dev: &Device,
    img: &[u8],
    version: &str,
) {
    assert_eq!(final_status["status"], "succeeded", "{final_status}");
    assert_eq!(final_status["response"]["firmware_version"], version);
    assert_eq!(final_status["response"]["update_result"], 1);
    assert_eq!(
        folded(events),
        [
            "queued",
            "sent",
            "downloading",
            "downloaded",
            "updating",
            "succeeded"
        ],
        "{events:?}"
    );
    let bytes: Vec<u64> = events
        .iter()
        .filter(|e| e["status"] == "downloading")
        .map(|e| e["progress"]["bytes"].as_u64().unwrap())
        .collect();
    assert!(bytes.windows(2).all(|w| w[0] <= w[1]), "{bytes:?}");
    let last = events
        .iter()
        .rfind(|e| e["status"] == "downloaded")
        .unwrap();
    assert_eq!(last["progress"]["bytes"], img.len());
    assert_eq!(last["progress"]["size"], img.len());
    assert_eq!(last["progress"]["percent"], 100);
    let done = events.last().unwrap();
    assert_eq!(done["device_id"], final_status["device_id"]);
    assert_eq!(done["tenant_id"], "acme");
    assert_eq!(done["method"], "firmware_update");
    assert_eq!(done["response"]["firmware_version"], version);
    assert_eq!(
        sha256_hex(dev.sim.fw_image()),
        sha256_hex(img),
        "the package on the device is byte-identical"
    );
}

#[test]
fn pull_and_push_of_2_mib_over_plain_coap_walk_object_5_to_success() {
    let broker = Broker::memory();
    let gw = Gateway::start(
        &broker,
        2,
        PROVISIONING,
        "[firmware]
poll_s = 5
",
    );
    let topic = reader(&broker, &["device.rpc.status.acme"]);
    let img2 = image(2 << 20);
    let mut img3 = image((2 << 20) + 333);
    img3[0] ^= 0xff;
    upload(&gw, "fw-2", "2.0.0", &img2);
    upload(&gw, "fw-3", "3.0.0", &img3);
    let mut dev = Device::new("urn:imei:123", gw.coap, 1);
    dev.sim.enable_firmware("1.0.0");
    assert_eq!(dev.register(0), Code::CREATED);

    // Pull: the Package URI names the gateway; the device fetches 2 MiB in
    // 1 KiB Block2 blocks from its shard.
    let id = rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"fw-pull","method":"firmware_update","params":{"image":"fw-2","method":"pull"},"timeout_ms":120000}"#,
    );
    let s = drive(
        &gw,
        &mut dev,
        &id,
        Duration::from_secs(120),
        reboot_plain("2.0.0"),
    );
    let ev = statuses(&broker, &topic, &id, DEV);
    check_success(&s, &ev, &dev, &img2, "2.0.0");
    let uri = dev.sim.bytes_of("/5/0/1").unwrap();
    assert_eq!(
        String::from_utf8(uri).unwrap(),
        format!("coap://{}/fw/fw-2", gw.coap)
    );
    let fw = dev.sim.fw.as_ref().unwrap();
    assert_eq!(fw.blocks.len(), 2048, "1 KiB blocks");
    assert!(gw.metric("firmware_bytes_served") >= 2 << 20);
    // The observations the update made are cancelled at the end.
    assert!(!dev.sim.is_observed("/5/0/3") && !dev.sim.is_observed("/5/0/5"));

    // Push: 2 MiB + 333 bytes written to /5/0/0 in Block1 blocks.
    let id = rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"fw-push","method":"firmware_update","params":{"image":"fw-3","method":"push"},"timeout_ms":120000}"#,
    );
    let s = drive(
        &gw,
        &mut dev,
        &id,
        Duration::from_secs(120),
        reboot_plain("3.0.0"),
    );
    let ev = statuses(&broker, &topic, &id, DEV);
    check_success(&s, &ev, &dev, &img3, "3.0.0");
    assert!(gw.metric("block1_sent") >= 2049);

    // A device asking for 256-byte blocks (SZX 4) gets them.
    let small = image(64 << 10);
    upload(&gw, "fw-small", "4.0.0", &small);
    dev.sim.block_szx = 4;
    let id = rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"fw-szx4","method":"firmware_update","params":{"image":"fw-small"}}"#,
    );
    let s = drive(
        &gw,
        &mut dev,
        &id,
        Duration::from_secs(60),
        reboot_plain("4.0.0"),
    );
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(dev.sim.fw_image(), &small[..]);
    assert_eq!(
        dev.sim.fw.as_ref().unwrap().blocks.len(),
        256,
        "256-byte blocks"
    );

    // A device answering 4.13 to a 1024-byte Block1 gets smaller blocks.
    dev.sim.block1_refuse_large = true;
    dev.sim.fw.as_mut().unwrap().push_szx.clear();
    let id = rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"fw-413","method":"firmware_update","params":{"image":"fw-small","method":"push"}}"#,
    );
    let s = drive(
        &gw,
        &mut dev,
        &id,
        Duration::from_secs(60),
        reboot_plain("4.0.0"),
    );
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(dev.sim.fw_image(), &small[..]);
    let fw = dev.sim.fw.as_ref().unwrap();
    assert_eq!(fw.refused_large, 1, "one 4.13, then the smaller size");
    assert_eq!(fw.push_szx.len(), 256);
    assert!(fw.push_szx.iter().all(|s| *s == 4));
    dev.sim.block1_refuse_large = false;
    dev.sim.block_szx = 6;

    // Update Result 5 (integrity check failure): failed with that result.
    dev.sim.fw.as_mut().unwrap().fail_download = Some(5);
    let id = rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"fw-bad","method":"firmware_update","params":{"image":"fw-small"}}"#,
    );
    let s = drive(&gw, &mut dev, &id, Duration::from_secs(60), |_| {
        panic!("no Update after a failed integrity check")
    });
    assert_eq!(s["status"], "failed", "{s}");
    assert_eq!(s["response"]["update_result"], 5);
    assert_eq!(
        s["reason"],
        "Update Result 5: integrity check failure for the new downloaded package"
    );
    let ev = statuses(&broker, &topic, &id, DEV);
    assert_eq!(
        folded(&ev),
        ["queued", "sent", "downloading", "failed"],
        "{ev:?}"
    );

    // Refusals before anything is sent: an unknown image, bad params.
    let id = rpc(
        &gw,
        DEV,
        r#"{"method":"firmware_update","params":{"image":"nope"}}"#,
    );
    let s = rpc_status(&gw, &id);
    assert_eq!(s["status"], "failed");
    assert!(
        s["reason"].as_str().unwrap().contains("no firmware image"),
        "{s}"
    );
    let id = rpc(
        &gw,
        DEV,
        r#"{"method":"firmware_update","params":{"image":"fw-2","method":"fax"}}"#,
    );
    assert!(rpc_status(&gw, &id)["reason"]
        .as_str()
        .unwrap()
        .contains("pull or push"));
}

fn image(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..n)
        .map(|_| {
            // xorshift: incompressible, reproducible bytes.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    openssl::sha::sha256(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[test]
fn images_upload_streamed_verified_listed_removed_and_kept_across_restarts() {
    let broker = Broker::memory();
    let mut gw = Gateway::start(
        &broker,
        2,
        "",
        "[firmware]\nmax_image_bytes = 4194304\nupload_timeout_s = 5\n",
    );
    let img = image(2 << 20);
    let sum = sha256_hex(&img);

    // 2 MiB with its checksum: 201 and the metadata.
    let (code, body) = http_bytes(
        gw.admin,
        "PUT",
        &format!("/v1/firmware/fw-1.2.0?version=1.2.0&sha256={sum}"),
        "",
        &img,
    )
    .unwrap();
    assert_eq!(code, 201, "{body}");
    let meta: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(meta["name"], "fw-1.2.0");
    assert_eq!(meta["version"], "1.2.0");
    assert_eq!(meta["size"], 2 << 20);
    assert_eq!(meta["sha256"], sum);

    // A wrong checksum: 422, the stored image is untouched.
    let (code, body) = http_bytes(
        gw.admin,
        "PUT",
        &format!("/v1/firmware/fw-1.2.0?version=9&sha256={}", "0".repeat(64)),
        "",
        &img[..1000],
    )
    .unwrap();
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("checksum_mismatch"), "{body}");
    // Larger than firmware.max_image_bytes (declared): 413 before reading.
    {
        let mut s = TcpStream::connect(gw.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "PUT /v1/firmware/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            (4 << 20) + 1
        )
        .unwrap();
        let mut resp = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut resp);
        assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    }
    // ... and undeclared (chunked): refused once the limit is passed.
    {
        let mut s = TcpStream::connect(gw.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "PUT /v1/firmware/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .unwrap();
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..(4 << 20) / chunk.len() + 1 {
            let sent = write!(s, "{:x}\r\n", chunk.len())
                .and_then(|_| s.write_all(&chunk))
                .and_then(|_| s.write_all(b"\r\n"));
            if sent.is_err() {
                break; // the server answered and closed
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
        let mut resp = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut resp);
        assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    }
    // Bad names: 400.
    let (code, body) = http_bytes(gw.admin, "PUT", "/v1/firmware/.hidden", "", b"x").unwrap();
    assert_eq!(code, 400, "{body}");
    let (code, _) = http_bytes(gw.admin, "PUT", "/v1/firmware/a%2Fb", "", b"x").unwrap();
    assert_eq!(code, 400);
    // A body that stops half-way (the client goes away): nothing stored.
    {
        let mut s = TcpStream::connect(gw.admin).unwrap();
        write!(
            s,
            "PUT /v1/firmware/partial HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        )
        .unwrap();
        s.write_all(&img[..50_000]).unwrap();
    }
    // A body that trickles past upload_timeout_s: 408, nothing stored.
    {
        let mut s = TcpStream::connect(gw.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        write!(
            s,
            "PUT /v1/firmware/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        )
        .unwrap();
        s.write_all(&img[..10]).unwrap();
        let mut resp = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut resp);
        assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    }

    let (code, body) = http(gw.admin, "GET", "/v1/firmware", "").unwrap();
    assert_eq!(code, 200);
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(list.len(), 1, "{body}");
    assert_eq!(list[0], meta);
    let (code, body) = http(gw.admin, "GET", "/v1/firmware/fw-1.2.0", "").unwrap();
    assert_eq!(
        (
            code,
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        ),
        (200, meta.clone())
    );
    assert_eq!(
        http(gw.admin, "GET", "/v1/firmware/nope", "").unwrap().0,
        404
    );

    // Replaced without a checksum: 200, the new size and sum.
    let img2 = image(300_000);
    let (code, body) = http_bytes(
        gw.admin,
        "PUT",
        "/v1/firmware/fw-1.2.0?version=1.2.1",
        "",
        &img2,
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let meta2: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(meta2["sha256"], sha256_hex(&img2));
    assert_eq!(meta2["version"], "1.2.1");

    // Kept across a restart; nothing temporary left in the store.
    assert_eq!(gw.stop(), Some(0));
    gw.spawn();
    let (code, body) = http(gw.admin, "GET", "/v1/firmware", "").unwrap();
    assert_eq!(code, 200);
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(list, vec![meta2]);
    let store = gw.dir.join("snap/firmware");
    let mut files: Vec<String> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    assert_eq!(files, vec!["fw-1.2.0.bin", "fw-1.2.0.json"]);
    assert_eq!(std::fs::read(store.join("fw-1.2.0.bin")).unwrap(), img2);

    assert_eq!(
        http(gw.admin, "DELETE", "/v1/firmware/fw-1.2.0", "")
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        http(gw.admin, "DELETE", "/v1/firmware/fw-1.2.0", "")
            .unwrap()
            .0,
        404
    );
    assert_eq!(
        http(gw.admin, "GET", "/v1/firmware", "").unwrap().1.trim(),
        "[]"
    );
}

#[test]
fn pull_and_push_resume_after_a_new_registration_from_a_new_address_and_silence_times_out() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, PROVISIONING, "[firmware]\npoll_s = 5\n");
    let topic = reader(&broker, &["device.rpc.status.acme"]);
    let img = image(2 << 20);
    upload(&gw, "fw-2", "2.0.0", &img);
    let mut dev = Device::new("urn:imei:123", gw.coap, 1);
    dev.sim.enable_firmware("1.0.0");
    assert_eq!(dev.register(0), Code::CREATED);

    // The download stops half-way (the device sleeps)...
    dev.sim.fw.as_mut().unwrap().stall_at = Some(1 << 20);
    let id = rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"fw-resume","method":"firmware_update","params":{"image":"fw-2"},"timeout_ms":120000}"#,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while dev
        .sim
        .fw
        .as_ref()
        .unwrap()
        .download
        .as_ref()
        .is_none_or(|d| d.body.len() < 1 << 20)
    {
        dev.pump(Duration::from_millis(20));
        assert!(Instant::now() < deadline, "download did not start");
    }
    // ... and wakes up behind a new address, registering again (any shard
    // may get it). It asks for the blocks it lacks; the update goes on.
    dev.new_port();
    assert_eq!(dev.register(0), Code::CREATED);
    dev.sim.fw.as_mut().unwrap().stall_at = None;
    let s = drive(
        &gw,
        &mut dev,
        &id,
        Duration::from_secs(120),
        reboot_plain("2.0.0"),
    );
    let ev = statuses(&broker, &topic, &id, DEV);
    check_success(&s, &ev, &dev, &img, "2.0.0");
    let blocks = &dev.sim.fw.as_ref().unwrap().blocks;
    assert_eq!(
        blocks.len(),
        2048,
        "no block fetched twice: {}",
        blocks.len()
    );
    assert!(blocks.windows(2).all(|w| w[1] == w[0] + 1));

    // A push interrupted by a new registration from a new address starts
    // again on the new registration and succeeds.
    let img3 = image(300_000);
    upload(&gw, "fw-3", "3.0.0", &img3);
    dev.sim.fw.as_mut().unwrap().push_stall_at = Some(100_000);
    let id = rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"fw-push-again","method":"firmware_update","params":{"image":"fw-3","method":"push"},"timeout_ms":120000}"#,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while dev.sim.fw.as_ref().unwrap().push_szx.len() < 90 {
        dev.pump(Duration::from_millis(20));
        assert!(Instant::now() < deadline, "push did not start");
    }
    dev.new_port();
    assert_eq!(dev.register(0), Code::CREATED);
    dev.sim.fw.as_mut().unwrap().push_stall_at = None;
    let s = drive(
        &gw,
        &mut dev,
        &id,
        Duration::from_secs(60),
        reboot_plain("3.0.0"),
    );
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(dev.sim.fw_image(), &img3[..]);
    assert_eq!(
        dev.sim.fw.as_ref().unwrap().pushes_started,
        2,
        "restarted once"
    );

    // A device that goes silent mid-transfer: timed_out at timeout_ms,
    // saying where it was.
    dev.sim.fw.as_mut().unwrap().stall_at = Some(256 << 10);
    let id = rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"fw-silent","method":"firmware_update","params":{"image":"fw-2"},"timeout_ms":6000}"#,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        dev.pump(Duration::from_millis(20));
        let d = dev
            .sim
            .fw
            .as_ref()
            .unwrap()
            .download
            .as_ref()
            .map(|d| d.body.len());
        if d.is_some_and(|n| n >= 256 << 10) {
            break;
        }
        assert!(Instant::now() < deadline);
    }
    dev.sim.silent = true;
    let s = drive(&gw, &mut dev, &id, Duration::from_secs(30), |_| {
        panic!("a silent device does not update")
    });
    assert_eq!(s["status"], "timed_out", "{s}");
    let reason = s["reason"].as_str().unwrap();
    assert!(
        reason.contains("downloading, 262144 of 2097152 bytes (12%)"),
        "{reason}"
    );
    let ev = statuses(&broker, &topic, &id, DEV);
    assert_eq!(
        folded(&ev),
        ["queued", "sent", "downloading", "timed_out"],
        "{ev:?}"
    );
}

/// A lossy link (every 9th datagram dropped each way), two shards: the
/// gateway retransmits its requests and Block1 blocks, the device its block
/// GETs, lost notifications are made up by the /5/0 poll; pull and push
/// both end `succeeded` with the image intact.
#[test]
fn pull_and_push_survive_a_lossy_link() {
    let broker = Broker::memory();
    let gw = Gateway::start(
        &broker,
        2,
        PROVISIONING,
        "[coap]\nack_timeout_ms = 300\n[firmware]\npoll_s = 2\n",
    );
    let img = image(48 << 10);
    upload(&gw, "fw-l", "2.0.0", &img);
    let mut dev = Device::new("urn:imei:123", gw.coap, 1);
    dev.sim.enable_firmware("1.0.0");
    assert_eq!(dev.register(0), Code::CREATED);
    dev.loss_every = Some(9);
    for (id, method) in [("lossy-pull", "pull"), ("lossy-push", "push")] {
        let id = rpc(
            &gw,
            DEV,
            &format!(
                r#"{{"rpc_id":"{id}","method":"firmware_update","params":{{"image":"fw-l","method":"{method}"}},"timeout_ms":120000}}"#
            ),
        );
        let s = drive(
            &gw,
            &mut dev,
            &id,
            Duration::from_secs(120),
            reboot_plain("2.0.0"),
        );
        assert_eq!(s["status"], "succeeded", "{method}: {s}");
        assert_eq!(s["response"]["firmware_version"], "2.0.0");
        assert_eq!(sha256_hex(dev.sim.fw_image()), sha256_hex(&img), "{method}");
    }
    assert!(gw.metric("retransmissions") > 0, "the loss was felt");
}

#[test]
fn pull_and_push_of_2_mib_over_dtls() {
    use corem_lwm2m::testkit::dtls_client::ClientAuth;
    const KEY: &str = "000102030405060708090a0b0c0d0e0f";
    let prov = format!(
        "[[endpoint]]\nendpoint = \"urn:imei:psk\"\ndevice_id = \"psk-device\"\ntenant_id = \"acme\"\npsk_identity = \"psk-1\"\npsk_key_hex = \"{KEY}\"\n"
    );
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, &prov, "[firmware]\npoll_s = 5\n");
    let topic = reader(&broker, &["device.rpc.status.acme"]);
    let img2 = image(2 << 20);
    let img3 = image((2 << 20) - 1);
    upload(&gw, "fw-2", "2.0.0", &img2);
    upload(&gw, "fw-3", "3.0.0", &img3);
    let auth = ClientAuth::Psk {
        identity: b"psk-1".to_vec(),
        key: corem_lwm2m::proto::lwm2m::endpoint::decode_hex(KEY).unwrap(),
    };
    let mut dev = Device::new_dtls("urn:imei:psk", gw.coaps, 3, &auth, "PSK-AES128-CCM8").unwrap();
    dev.sim.enable_firmware("1.0.0");
    assert_eq!(dev.register(0), Code::CREATED);
    let coaps = gw.coaps;
    let reboot_dtls = |version: &'static str| {
        let auth = auth.clone();
        move |dev: &mut Device| {
            dev.sim.fw_reboot(version);
            // A new handshake after the reboot, then Register.
            dev.dtls = Some(std::cell::RefCell::new(
                dtls_connect(coaps, &auth, "PSK-AES128-CCM8").unwrap(),
            ));
            assert_eq!(dev.register(0), Code::CREATED);
        }
    };

    // Pull over the device's own DTLS session: a coaps:// Package URI.
    let id = rpc(
        &gw,
        "psk-device",
        r#"{"rpc_id":"d-pull","method":"firmware_update","params":{"image":"fw-2"},"timeout_ms":120000}"#,
    );
    let s = drive(
        &gw,
        &mut dev,
        &id,
        Duration::from_secs(120),
        reboot_dtls("2.0.0"),
    );
    let ev = statuses(&broker, &topic, &id, "psk-device");
    check_success(&s, &ev, &dev, &img2, "2.0.0");
    assert_eq!(
        String::from_utf8(dev.sim.bytes_of("/5/0/1").unwrap()).unwrap(),
        format!("coaps://{}/fw/fw-2", gw.coaps)
    );

    // Push in Block1 blocks through DTLS records.
    let id = rpc(
        &gw,
        "psk-device",
        r#"{"rpc_id":"d-push","method":"firmware_update","params":{"image":"fw-3","method":"push"},"timeout_ms":120000}"#,
    );
    let s = drive(
        &gw,
        &mut dev,
        &id,
        Duration::from_secs(120),
        reboot_dtls("3.0.0"),
    );
    let ev = statuses(&broker, &topic, &id, "psk-device");
    check_success(&s, &ev, &dev, &img3, "3.0.0");
    // Nothing went out in the clear.
    assert_eq!(gw.metric("dtls_tx_no_session"), 0);
}

/// The fleet: `lwm2m-loadgen --firmware` (one process, its own sockets),
/// idle devices that download, report and reboot like the sim device.
struct Fleet {
    child: std::process::Child,
}

impl Fleet {
    fn start(gw: &Gateway, n: usize, fail_every: usize) -> Fleet {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_lwm2m-loadgen"))
            .args(["--server", &gw.coap.to_string()])
            .args([
                "--devices",
                &n.to_string(),
                "--tenant",
                "fleet",
                "--workers",
                "1",
            ])
            .args([
                "--idle",
                "--no-deregister",
                "--duration",
                "600",
                "--lifetime",
                "600",
            ])
            .args(["--firmware", "--fw-fail-every", &fail_every.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Fleet { child }
    }

    /// Until the gateway counted `n` registrations.
    fn wait_registered(&self, gw: &Gateway, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while gw.metric("registrations") < n {
            assert!(Instant::now() < deadline, "fleet did not register");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn campaign(gw: &Gateway, id: &str) -> serde_json::Value {
    let (code, b) = http(gw.admin, "GET", &format!("/v1/firmware/campaigns/{id}"), "").unwrap();
    assert_eq!(code, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

/// Campaigns over 1,000 devices (every tenth reports Update Result 5): one
/// with concurrency 100 and no threshold runs to the end with the counts
/// right and never more than 100 updates unfinished; one with a 5%
/// threshold pauses.
#[test]
fn campaigns_over_1000_devices_complete_and_pause_past_the_failure_threshold() {
    let n = 1000;
    let dir = tempdir();
    let prov = dir.join("fleet.toml");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_lwm2m-loadgen"))
        .args([
            "--devices",
            &n.to_string(),
            "--tenant",
            "fleet",
            "--write-provisioning",
        ])
        .arg(&prov)
        .status()
        .unwrap();
    assert!(st.success());
    let broker = Broker::memory();
    let gw = Gateway::start(
        &broker,
        2,
        &std::fs::read_to_string(&prov).unwrap(),
        "[firmware]\npoll_s = 10\n",
    );
    let img = image(8 << 10);
    upload(&gw, "fw-small", "2.0", &img);
    let fleet = Fleet::start(&gw, n, 10);
    fleet.wait_registered(&gw, n as i64);

    // Refusals: no devices, unknown ones, an unknown image, bad settings.
    for (body, code) in [
        (r#"{"image":"fw-small"}"#, 400),
        (r#"{"image":"fw-small","devices":["nope"]}"#, 422),
        (r#"{"image":"gone","selector":{"tenant_id":"fleet"}}"#, 422),
        (
            r#"{"image":"fw-small","selector":{"tenant_id":"fleet"},"concurrency":0}"#,
            400,
        ),
        (
            r#"{"image":"fw-small","selector":{"tenant_id":"nobody"}}"#,
            422,
        ),
        (r#"{"imag":"fw-small"}"#, 400),
    ] {
        let (c, b) = http(gw.admin, "POST", "/v1/firmware/campaigns", body).unwrap();
        assert_eq!(c, code, "{body}: {b}");
    }

    let (code, b) = http(
        gw.admin,
        "POST",
        "/v1/firmware/campaigns",
        r#"{"campaign_id":"all","image":"fw-small","selector":{"tenant_id":"fleet"},"concurrency":100,"timeout_ms":120000}"#,
    )
    .unwrap();
    assert_eq!(code, 201, "{b}");
    let (code, _) = http(
        gw.admin,
        "POST",
        "/v1/firmware/campaigns",
        r#"{"campaign_id":"all","image":"fw-small","devices":["lg-00000001"]}"#,
    )
    .unwrap();
    assert_eq!(code, 409, "the same campaign_id again");
    let deadline = Instant::now() + Duration::from_secs(240);
    let v = loop {
        let v = campaign(&gw, "all");
        let c = &v["counts"];
        let unfinished: u64 = ["queued", "sent", "downloading", "downloaded", "updating"]
            .iter()
            .map(|k| c[*k].as_u64().unwrap())
            .sum();
        assert!(unfinished <= 100, "concurrency exceeded: {v}");
        if v["state"] != "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "campaign not done: {v}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(v["state"], "completed", "{v}");
    if v["counts"]["timed_out"] != 0 {
        for i in 0..n {
            let r = rpc_status(&gw, &format!("all:{i}"));
            if r["status"] == "timed_out" {
                eprintln!("TIMED OUT {r}");
            }
        }
    }
    assert_eq!(v["devices"], 1000);
    assert_eq!(v["finished"], 1000);
    assert_eq!(v["counts"]["succeeded"], 900, "{v}");
    assert_eq!(v["counts"]["failed"], 100, "{v}");
    assert_eq!(v["counts"]["pending"], 0);
    assert_eq!(v["failures"].as_array().unwrap().len(), 20);
    // One of them, as an ordinary RPC.
    let f = &v["failures"][0];
    let r = rpc_status(&gw, f["rpc_id"].as_str().unwrap());
    assert_eq!(r["response"]["update_result"], 5, "{r}");
    let ok = rpc_status(&gw, "all:1");
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(ok["response"]["firmware_version"], "2.0");

    // 10% failing, threshold 5%: paused, and nothing new starts.
    let (code, b) = http(
        gw.admin,
        "POST",
        "/v1/firmware/campaigns",
        r#"{"campaign_id":"strict","image":"fw-small","selector":{"tenant_id":"fleet"},"concurrency":100,"failure_threshold_percent":5,"timeout_ms":120000}"#,
    )
    .unwrap();
    assert_eq!(code, 201, "{b}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let v = loop {
        let v = campaign(&gw, "strict");
        if v["state"] != "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["state"], "paused", "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("5% threshold"),
        "{v}"
    );
    // The updates already started finish; no others start.
    std::thread::sleep(Duration::from_secs(5));
    let v = campaign(&gw, "strict");
    let pending = v["counts"]["pending"].as_u64().unwrap();
    assert!(pending >= 700, "{v}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(campaign(&gw, "strict")["counts"]["pending"], pending);
    // Cancelled: it stays cancelled; the list shows both.
    let (code, b) = http(gw.admin, "POST", "/v1/firmware/campaigns/strict/cancel", "").unwrap();
    assert_eq!(code, 200, "{b}");
    let (code, b) = http(gw.admin, "POST", "/v1/firmware/campaigns/strict/resume", "").unwrap();
    assert_eq!(code, 409, "{b}");
    let (_, b) = http(gw.admin, "GET", "/v1/firmware/campaigns", "").unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_str(&b).unwrap();
    let states: Vec<&str> = list.iter().map(|c| c["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["completed", "cancelled"]);
    drop(fleet);
}
