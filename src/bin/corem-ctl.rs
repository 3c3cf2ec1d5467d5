//! `corem-ctl`: operate a running corem-lwm2m gateway through its admin
//! API (see `corem-ctl --help` and the README's "Running it in
//! production").

use clap::Parser;

fn main() {
    let cli = corem_lwm2m::ctl::Cli::try_parse().unwrap_or_else(|e| {
        let code = if e.use_stderr() {
            corem_lwm2m::ctl::EXIT_USAGE
        } else {
            0
        };
        let _ = e.print();
        std::process::exit(code);
    });
    let mut out = std::io::stdout().lock();
    let code = corem_lwm2m::ctl::run(cli, &mut out);
    std::process::exit(code);
}
