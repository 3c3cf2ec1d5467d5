//! Interoperability with a CoAP client we did not write: libcoap's
//! `coap-client-openssl` (Debian `libcoap3-bin`, installed by scripts/setup).
//! Every invocation opens a new socket, so every request comes from a new
//! source port, which on a two-shard gateway lands on either shard: exactly
//! the client behaviour that used to get 4.04 for Update and De-register.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// Runs coap-client with verbose PDU logging; returns (response code,
/// Location-Path segments) of the answer.
fn coap_client(args: &[&str]) -> (String, Vec<String>) {
    let out = Command::new("coap-client-openssl")
        .args(["-B", "5", "-v", "7"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("coap-client-openssl not runnable ({e}); run scripts/setup"));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // The response PDU line: "v:1 t:ACK c:2.01 i:476d {01} [ Location-Path:rd, ... ]"
    let line = text
        .lines()
        .find(|l| l.contains("t:ACK c:") && !l.contains("c:0.00"))
        .unwrap_or_else(|| panic!("no response in coap-client output:\n{text}"));
    let code = line
        .split("c:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("")
        .to_string();
    let locs = line
        .split("Location-Path:")
        .skip(1)
        .map(|s| s.split([',', ' ', ']']).next().unwrap_or("").to_string())
        .collect();
    (code, locs)
}

#[test]
fn libcoap_client_registers_updates_and_deregisters_from_new_ports() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, PROVISIONING, "");
    let status = reader(&broker, &["device.status.acme"]);
    let base = format!("coap://{}", gw.coap);
    let (code, loc) = coap_client(&[
        "-m",
        "post",
        "-t",
        "40",
        "-e",
        "</1/0>,</3/0>,</3303/0>",
        &format!("{base}/rd?ep=urn:imei:123&lt=300&lwm2m=1.1&b=U"),
    ]);
    assert_eq!(code, "2.01");
    assert_eq!(loc.len(), 2, "{loc:?}");
    assert_eq!(loc[0], "rd");
    let location = &loc[1];
    for i in 0..10 {
        let (code, _) = coap_client(&["-m", "post", &format!("{base}/rd/{location}?lt=600")]);
        assert_eq!(code, "2.04", "update {i} from a new port");
    }
    assert_eq!(gw.metric("registrations"), 1, "no re-registration");
    assert_eq!(gw.metric("update_unknown"), 0);
    let (code, _) = coap_client(&["-m", "delete", &format!("{base}/rd/{location}")]);
    assert_eq!(code, "2.02");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gw.metric("registrations_active"), 0);
    let mut st = read_matching(&status, 12, Duration::from_secs(20), |_| true);
    st.sort_by_key(|s| s.value["registration"]["seq"].as_u64().unwrap_or(0));
    assert_eq!(st.len(), 12);
    assert_eq!(st[0].value["reason"], "registered");
    assert!(st[1..11]
        .iter()
        .all(|s| s.value["reason"] == "updated" && s.value["registration"]["lifetime_s"] == 600));
    assert_eq!(st[11].value["reason"], "deregistered");
    // The old location is gone for everyone; a stranger's request carries
    // no diagnostic payload.
    let (code, _) = coap_client(&["-m", "post", &format!("{base}/rd/{location}")]);
    assert_eq!(code, "4.04");
}
