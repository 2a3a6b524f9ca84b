use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ambit_ctl::config::Cli::parse();
    match ambit_ctl::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The chain of causes, each once: many of our errors already quote theirs.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            ambit_ctl::output::stderr(format_args!("ambitctl: {message}"));
            ExitCode::FAILURE
        }
    }
}
