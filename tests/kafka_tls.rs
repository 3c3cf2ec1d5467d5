//! The gateway publishing through a TLS broker listener: the broker's CA
//! verified; a wrong CA fails with a clear log line and the points are held
//! (not acknowledged, so the device keeps them), then delivered once the
//! gateway trusts the right CA.

mod common;

use common::*;
use corem_lwm2m::proto::coap::{Code, MsgType};
use corem_lwm2m::proto::lwm2m::content::ResourcePath;
use corem_lwm2m::testkit::certs::{self, Pki};
use std::time::Duration;

#[test]
fn gateway_publishes_through_tls_and_holds_points_on_a_wrong_ca() {
    let dir = tempdir();
    let pki = Pki::new("broker CA");
    let (c, k) = pki.issue("localhost", &["localhost", "127.0.0.1"]);
    let (cert, key) = certs::write_pem(&dir, "broker", &c, &k);
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, pki.cert.to_pem().unwrap()).unwrap();
    let other = Pki::new("some other CA");
    let wrong_ca = dir.join("other.crt");
    std::fs::write(&wrong_ca, other.cert.to_pem().unwrap()).unwrap();

    let backend = free_tcp_port();
    let proxy = TlsProxy::start(backend, &cert, &key);
    let broker = Broker::memory_behind(backend, proxy.port);
    let tls_brokers = format!("127.0.0.1:{}", proxy.port);
    let tls_cfg = |ca: &std::path::Path| {
        format!(
            "[kafka]\nbrokers = \"{tls_brokers}\"\n[kafka.tls]\nca_file = \"{}\"\n",
            ca.display()
        )
    };

    // A wrong CA first: the gateway cannot reach the broker. Register is
    // answered (its status event is queued), but a CON notification is not
    // acknowledged: its value is held by the device, not lost.
    let extra = tls_cfg(&wrong_ca) + "[gateway]\nshutdown_flush_ms = 300\n";
    let mut gw = Gateway::start(&broker, 1, PROVISIONING, &extra);
    let mut dev = Device::new("urn:imei:env", gw.coap, 7);
    dev.sim
        .values
        .insert(ResourcePath::parse("/3303/0/5700").unwrap(), 30.5);
    assert_eq!(dev.register(1), Code::CREATED);
    dev.sim
        .values
        .insert(ResourcePath::parse("/3303/0/5700").unwrap(), 31.5);
    let (mid, held) = dev.sim.notify("/3303/0", true).unwrap();
    let acked = |dev: &mut Device, secs: u64| {
        let end = std::time::Instant::now() + Duration::from_secs(secs);
        let mut buf = [0u8; 2048];
        let mut next = std::time::Instant::now();
        while std::time::Instant::now() < end {
            if std::time::Instant::now() >= next {
                dev.send(&held);
                next = std::time::Instant::now() + Duration::from_millis(500);
            }
            if let Some(n) = dev.recv_one(&mut buf) {
                if let Ok(m) = corem_lwm2m::proto::coap::Message::decode(&buf[..n]) {
                    if m.message_id == mid && m.mtype == MsgType::Ack {
                        return true;
                    }
                }
            }
        }
        false
    };
    assert!(!acked(&mut dev, 4), "acknowledged without the broker");
    assert!(
        gw.log_contains("TLS/SASL connection to the broker failed"),
        "no clear log line for the TLS failure"
    );
    assert_eq!(gw.metric("kafka_delivered"), 0);
    gw.stop();

    // The right CA: the device's retransmission of the same notification is
    // acknowledged once its point is on the topic (over TLS).
    let (wrong, right) = (wrong_ca.display().to_string(), ca.display().to_string());
    gw.edit_config(|c| c.replace(&wrong, &right));
    gw.spawn();
    assert!(
        acked(&mut dev, 20),
        "the held notification was never acknowledged"
    );
    let ca_s = ca.to_string_lossy().to_string();
    let reader = corem_lwm2m::tools::topic_reader::TopicReader::with_config(
        &tls_brokers,
        &["telemetry.raw.acme".to_string()],
        Duration::from_secs(30),
        &[("security.protocol", "ssl"), ("ssl.ca.location", &ca_s)],
    )
    .unwrap();
    let pts = read_matching(&reader, 1, Duration::from_secs(20), |r| {
        r.value["numeric_values"]["temperature"] == 31.5
    });
    assert_eq!(pts.len(), 1);
    assert_eq!(pts[0].value["device_id"], "env-device");
    assert_eq!(pts[0].value["endpoint"], "urn:imei:env");
    assert!(gw.metric("kafka_delivered") >= 1);
}
