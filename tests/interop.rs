//! Interoperability with a CoAP client we did not write: libcoap's
//! `coap-client-openssl` (Debian `libcoap3-bin`, installed by scripts/setup).
//! Every invocation opens a new socket, so every request comes from a new
//! source port, which on a two-shard gateway lands on either shard: exactly
//! the client behaviour that used to get 4.04 for Update and De-register.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// Runs coap-client-openssl; returns (response code, Location-Path
/// segments) of the answer.
fn coap_client(args: &[&str]) -> (String, Vec<String>) {
    let (text, r) = run_client("coap-client-openssl", args);
    r.unwrap_or_else(|| panic!("no response in coap-client output:\n{text}"))
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

/// Runs a libcoap client binary with verbose PDU logging; returns its
/// combined output and (response code, Location-Path segments) of the
/// first non-empty ACK ("v:1 t:ACK c:2.01 i:476d {01} [ Location-Path:rd, ... ]"),
/// if any.
fn run_client(bin: &str, args: &[&str]) -> (String, Option<(String, Vec<String>)>) {
    let out = Command::new(bin)
        .args(["-B", "5", "-v", "7"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{bin} not runnable ({e}); run scripts/setup"));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("t:ACK c:") && !l.contains("c:0.00"))
        .map(|line| {
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
        });
    (text, line)
}

const LIBCOAP_PSK: &str = "libcoap-psk-key!";

fn dtls_provisioning() -> String {
    let hex: String = LIBCOAP_PSK.bytes().map(|b| format!("{b:02x}")).collect();
    format!(
        r#"
[[endpoint]]
endpoint = "urn:imei:libcoap-psk"
device_id = "libcoap-psk-device"
tenant_id = "acme"
psk_identity = "libcoap-dev"
psk_key_hex = "{hex}"

[[endpoint]]
endpoint = "urn:imei:libcoap-cert"
device_id = "libcoap-cert-device"
tenant_id = "acme"
x509 = true
"#
    )
}

#[test]
fn libcoap_dtls_clients_register_with_psk_and_certificates() {
    use corem_lwm2m::testkit::certs::{self, Pki};
    let broker = Broker::memory();
    let dir = tempdir();
    let pki = Pki::new("interop CA");
    let (c, k) = pki.issue("localhost", &["localhost", "127.0.0.1"]);
    certs::write_pem(&dir, "gateway", &c, &k);
    let (dc, dk) = pki.issue("urn:imei:libcoap-cert", &[]);
    let (dev_cert, dev_key) = certs::write_pem(&dir, "device", &dc, &dk);
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, pki.cert.to_pem().unwrap()).unwrap();
    let extra = format!(
        "[dtls]\ncert_file = \"{0}/gateway.crt\"\nkey_file = \"{0}/gateway.key\"\nca_file = \"{0}/ca.crt\"\n",
        dir.display()
    );
    let gw = Gateway::start(&broker, 2, &dtls_provisioning(), &extra);
    let status = reader(&broker, &["device.status.acme"]);
    let base = format!("coaps://{}", gw.coaps);
    let mut registered = 0;
    for bin in ["coap-client-openssl", "coap-client-gnutls"] {
        // PSK.
        let (text, r) = run_client(
            bin,
            &[
                "-u",
                "libcoap-dev",
                "-k",
                LIBCOAP_PSK,
                "-m",
                "post",
                "-e",
                "</1/0>,</3/0>",
                &format!("{base}/rd?ep=urn:imei:libcoap-psk&lt=300&lwm2m=1.1&b=U"),
            ],
        );
        let (code, loc) = r.unwrap_or_else(|| panic!("{bin} PSK: no response:\n{text}"));
        assert_eq!(code, "2.01", "{bin} PSK");
        assert_eq!(loc.first().map(String::as_str), Some("rd"), "{loc:?}");
        registered += 1;
        // A wrong key: the handshake fails, no registration.
        let (text, r) = run_client(
            bin,
            &[
                "-u",
                "libcoap-dev",
                "-k",
                "not-the-key-1234",
                "-m",
                "post",
                "-e",
                "</1/0>",
                &format!("{base}/rd?ep=urn:imei:libcoap-psk&lt=300"),
            ],
        );
        assert!(r.is_none(), "{bin} wrong key answered:\n{text}");
        // A certificate issued by the gateway's CA, naming the endpoint.
        let (text, r) = run_client(
            bin,
            &[
                "-c",
                dev_cert.to_str().unwrap(),
                "-j",
                dev_key.to_str().unwrap(),
                "-C",
                ca.to_str().unwrap(),
                "-m",
                "post",
                "-e",
                "</1/0>,</3/0>",
                &format!("{base}/rd?ep=urn:imei:libcoap-cert&lt=300&lwm2m=1.1&b=U"),
            ],
        );
        let (code, _) = r.unwrap_or_else(|| panic!("{bin} certificate: no response:\n{text}"));
        assert_eq!(code, "2.01", "{bin} certificate");
        registered += 1;
    }
    let st = read_matching(&status, registered, Duration::from_secs(20), |r| {
        r.value["reason"] == "registered"
    });
    assert_eq!(st.len(), registered);
    assert!(st.iter().all(|s| s.value["registration"]["address"]
        .as_str()
        .unwrap()
        .starts_with("coaps://")));
    assert_eq!(gw.metric("dtls_handshakes_completed"), 4);
}
