//! Firmware updates over LwM2M object 5 (TS 1.1 Core §E.6), end to end
//! against the gateway binary. So far: the image store behind the admin API
//! (`PUT /v1/firmware/{name}` streamed and checksum-verified, `GET`,
//! `DELETE`), surviving a restart.

mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

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
