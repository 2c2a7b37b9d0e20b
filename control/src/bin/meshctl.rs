//! `meshctl`: inspect a running mesh (see `control::meshctl`).

use std::{process::ExitCode, time::SystemTime};

use clap::Parser;
use control::meshctl::{Cli, certs::unix, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli, unix(SystemTime::now()))) {
        Ok(rendered) => {
            print!("{}", rendered.text);
            // Partial answers are printed, and the exit status tells scripts something was missing.
            if rendered.complete { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::FAILURE
        }
    }
}
