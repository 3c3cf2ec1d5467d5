#![no_main]
//! What `corem-ctl` reads from outside: provisioning CSV files, the admin
//! API's HTTP responses, Prometheus text. Never panics, and a parsed CSV
//! is a JSON array of objects of strings.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(v) = corem_lwm2m::ctl::csv::endpoints(text) {
                    for item in v.as_array().expect("an array") {
                        for (_, f) in item.as_object().expect("objects") {
                            assert!(f.is_string());
                        }
                    }
                }
                let _ = corem_lwm2m::ctl::csv::parse(text);
            }
        }
        1 => {
            if let Some(r) = corem_lwm2m::ctl::http::parse_response(rest) {
                let _ = r.json();
                let _ = r.text();
            }
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            let _ = corem_lwm2m::ctl::prom_sum(&text, "corem_lwm2m_points_published_total");
        }
    }
});
