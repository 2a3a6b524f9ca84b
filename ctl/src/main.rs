use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ambit_ctl::config::Cli::parse();
    match ambit_ctl::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ambitctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
