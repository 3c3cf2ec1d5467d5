//! `/metrics` as a real Prometheus reads it: after a device registered,
//! sent CON notifications and answered a reboot RPC on a two-shard gateway,
//! `promtool check metrics` (Debian's prometheus package) finds nothing to
//! complain about, every histogram the operator dashboards use has samples,
//! and a real Prometheus server scrapes the gateway and answers queries on
//! its series.

mod common;

use common::*;
use corem_lwm2m::proto::coap::{Code, MsgType};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEV: &str = "d7b1c0e2-3f44-4a91-9b2e-2c5a1f0e9d33";

/// The value of the sample line `series` (exact name and labels).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Sum of `name` over the shard label.
fn sum_over_shards(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{shard=")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A gateway with one device registered (4 observations), 5 CON points
/// acknowledged after delivery, and a reboot RPC that succeeded.
fn busy_gateway(broker: &Broker) -> (Gateway, Device) {
    let gw = Gateway::start(broker, 2, PROVISIONING, "");
    let mut dev = Device::new("urn:imei:123", gw.coap, 1);
    assert_eq!(dev.register(4), Code::CREATED);
    for _ in 0..5 {
        assert_eq!(
            dev.notify_con("/3303/0/5700", Duration::from_secs(10)),
            Some(MsgType::Ack)
        );
    }
    let (code, b) = http(
        gw.admin,
        "POST",
        &format!("/v1/devices/{DEV}/rpc"),
        r#"{"rpc_id":"m-1","method":"reboot","timeout_ms":20000}"#,
    )
    .unwrap();
    assert_eq!(code, 202, "{b}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        dev.pump(Duration::from_millis(50));
        let (_, b) = http(gw.admin, "GET", "/v1/rpc/m-1", "").unwrap();
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        if v["status"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "rpc not finished: {v}");
    }
    (gw, dev)
}

#[test]
fn metrics_pass_promtool_and_histograms_have_samples() {
    let broker = Broker::memory();
    let (gw, _dev) = busy_gateway(&broker);
    // Deliveries and their histogram are served by the shard's producer
    // poll: give it a moment after the last ACK.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (code, body) = http(gw.admin, "GET", "/metrics", "").unwrap();
        assert_eq!(code, 200);
        if sum_over_shards(&body, "corem_lwm2m_kafka_delivery_seconds_count") >= 7.0
            || Instant::now() > deadline
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    // Conventions: every family has HELP and TYPE, counters end in _total.
    let mut families = 0;
    for l in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut it = l[7..].split(' ');
        let (name, kind) = (it.next().unwrap(), it.next().unwrap());
        families += 1;
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter {name}");
        } else {
            assert!(!name.ends_with("_total"), "{kind} {name}");
        }
    }
    assert!(families > 100, "{families} families");

    // The histograms saw what happened, per shard (the device is on one).
    for (h, at_least) in [
        ("corem_lwm2m_registration_setup_seconds", 1.0),
        ("corem_lwm2m_observe_setup_seconds", 4.0),
        ("corem_lwm2m_con_ack_delay_seconds", 5.0),
        ("corem_lwm2m_kafka_delivery_seconds", 7.0),
        ("corem_lwm2m_rpc_device_seconds", 1.0),
    ] {
        let n = sum_over_shards(&body, &format!("{h}_count"));
        assert!(n >= at_least, "{h}_count {n} < {at_least}\n{body}");
        let inf = sum_over_shards(&body, &format!("{h}_bucket"));
        assert!(inf >= n, "{h} buckets");
        assert!(
            body.contains(&format!("{h}_bucket{{shard=\"1\",le=\"+Inf\"}}")),
            "{h}: both shards rendered"
        );
    }
    assert_eq!(
        sample(
            &body,
            "corem_lwm2m_rpc_finished_total{status=\"succeeded\"}"
        ),
        Some(1.0)
    );
    assert_eq!(sample(&body, "corem_lwm2m_rpc_accepted_total"), Some(1.0));
    assert_eq!(
        sample(&body, "corem_lwm2m_rpc_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        sum_over_shards(&body, "corem_lwm2m_registrations_total"),
        1.0
    );
    assert_eq!(
        sum_over_shards(&body, "corem_lwm2m_registrations_active"),
        1.0
    );
    assert_eq!(sample(&body, "corem_lwm2m_shards"), Some(2.0));
    let rss = sample(&body, "process_resident_memory_bytes").unwrap();
    assert!(rss > 1e6, "rss {rss}");
    assert!(sample(&body, "process_cpu_seconds_total").unwrap() > 0.0);
    assert!(sample(&body, "process_open_fds").unwrap() >= 3.0);

    // promtool's linter: no output, exit 0.
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup installs it)");
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Prometheus's HTTP API: the `data.result` of an instant query.
fn prom_query(port: u16, q: &str) -> Vec<serde_json::Value> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    match http(addr, "GET", &format!("/api/v1/query?query={enc}"), "") {
        Ok((200, b)) => {
            let v: serde_json::Value = serde_json::from_str(&b).unwrap_or_default();
            v["data"]["result"].as_array().cloned().unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

#[test]
fn a_real_prometheus_scrapes_the_gateway() {
    let broker = Broker::memory();
    let (gw, _dev) = busy_gateway(&broker);
    let dir = tempdir();
    let port = free_tcp_port();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: corem-lwm2m\n    static_configs:\n      - targets: ['{}']\n",
            gw.admin
        ),
    )
    .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = Kill(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package; scripts/setup installs it)"),
    );

    // The scrape succeeded (up = 1) and the gateway's series are queryable:
    // one registration on one of the two shards, the RPC counted, the
    // delivery histogram's buckets usable by histogram_quantile.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ok = loop {
        let up = prom_query(port, "up{job=\"corem-lwm2m\"}");
        let regs = prom_query(port, "corem_lwm2m_registrations_active");
        let rpc = prom_query(port, "corem_lwm2m_rpc_finished_total{status=\"succeeded\"}");
        let p99 = prom_query(
            port,
            "histogram_quantile(0.99, sum by (le) (corem_lwm2m_kafka_delivery_seconds_bucket))",
        );
        let val = |r: &[serde_json::Value], i: usize| -> f64 {
            r.get(i)
                .and_then(|s| s["value"][1].as_str())
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let done = up.len() == 1
            && val(&up, 0) == 1.0
            && regs.len() == 2
            && val(&regs, 0) + val(&regs, 1) == 1.0
            && rpc.len() == 1
            && val(&rpc, 0) == 1.0
            && p99.len() == 1
            && val(&p99, 0) > 0.0;
        if done {
            break true;
        }
        if Instant::now() > deadline {
            eprintln!("up {up:?}\nregs {regs:?}\nrpc {rpc:?}\np99 {p99:?}");
            eprintln!(
                "{}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(ok, "prometheus did not return the gateway's series");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Metric names in a PromQL expression: identifiers of our families and the
/// process metrics (label names, functions and `$variables` are not).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let word = &expr[start..i];
            let after_dollar = start > 0 && b[start - 1] == b'$';
            if !after_dollar
                && (word.starts_with("corem_lwm2m_")
                    || word.starts_with("process_")
                    || word == "up")
            {
                out.push(word.to_string());
            }
        } else if c == b'"' {
            // Skip label values.
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += 1;
            }
            i += 1;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn every_dashboard_panel_queries_a_metric_the_gateway_exports() {
    let broker = Broker::memory();
    let (gw, _dev) = busy_gateway(&broker);
    let (_, body) = http(gw.admin, "GET", "/metrics", "").unwrap();
    let mut families = std::collections::HashMap::new();
    for l in body.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut it = l.split(' ');
        families.insert(
            it.next().unwrap().to_string(),
            it.next().unwrap().to_string(),
        );
    }
    // `up` is written by Prometheus for every scrape target.
    families.insert("up".into(), "gauge".into());
    let exported = |name: &str| -> bool {
        if families.contains_key(name) {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suf| {
            name.strip_suffix(suf)
                .is_some_and(|base| families.get(base).is_some_and(|k| k == "histogram"))
        })
    };

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/corem-lwm2m.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("dashboard JSON");
    assert_eq!(dash["uid"], "corem-lwm2m");
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        panels.push(p);
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
    }
    let mut checked = 0;
    let mut missing = Vec::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("?");
        let targets = p["targets"].as_array().map(|t| t.as_slice()).unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel {title:?}: no metric in {expr:?}");
            for n in names {
                checked += 1;
                if !exported(&n) {
                    missing.push(format!("{title}: {n}"));
                }
            }
        }
    }
    // The gateway variable's query too.
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            for n in metric_names(q) {
                if !exported(&n) {
                    missing.push(format!("variable {}: {n}", v["name"]));
                }
            }
        }
    }
    assert!(missing.is_empty(), "not exported: {missing:#?}");
    assert!(checked > 50, "{checked} metric references");
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(corem_lwm2m_x_bucket{instance=~"$instance",a="corem_lwm2m_no"}[5m])))"#
        ),
        vec!["corem_lwm2m_x_bucket"]
    );
    assert_eq!(
        metric_names("rate(process_cpu_seconds_total[1m]) + up"),
        vec!["process_cpu_seconds_total", "up"]
    );
}
