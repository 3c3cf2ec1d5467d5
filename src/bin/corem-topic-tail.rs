//! `corem-topic-tail`: prints the records of CORE-M topics as they arrive
//! (key and JSON value), e.g. `telemetry.raw.demo` and `device.status.demo`.
//! Debian's kcat is too old for the bundled broker; this is our window.

use clap::Parser;
use corem_lwm2m::tools::topic_reader::TopicReader;
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Topics to read, from the beginning.
    #[arg(required = true)]
    topics: Vec<String>,
    /// Stop after this many records (0 = no limit).
    #[arg(long, default_value_t = 0)]
    count: usize,
    /// Stop after this many seconds (0 = no limit).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let r = TopicReader::new(&a.brokers, &a.topics, Duration::from_secs(30))?;
    let start = Instant::now();
    let mut n = 0;
    loop {
        for rec in r.read(usize::MAX, Duration::from_millis(500)) {
            n += 1;
            let line = format!(
                "{} [{}@{}] key={} {}",
                rec.topic,
                rec.partition,
                rec.offset,
                rec.key.unwrap_or_default(),
                rec.value
            );
            // A closed pipe (e.g. `| head`) ends the program quietly.
            if writeln!(std::io::stdout(), "{line}").is_err() {
                return Ok(());
            }
            if a.count > 0 && n >= a.count {
                return Ok(());
            }
        }
        if a.seconds > 0 && start.elapsed() >= Duration::from_secs(a.seconds) {
            return Ok(());
        }
    }
}
