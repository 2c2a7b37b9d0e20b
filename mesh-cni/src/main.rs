//! `mesh-cni`: the CNI plugin (no arguments; `CNI_*` environment and configuration on
//! stdin) and its installer (`install`, `uninstall`). See the crate docs of `mesh_cni`.

use std::{io::Read, process::ExitCode};

use mesh_cni::{
    contract::{CniError, code},
    install, plugin,
    spec::{DEFAULT_VERSION, error_result},
};

/// The largest network configuration read from stdin.
const MAX_STDIN: u64 = 1024 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => run_plugin(),
        Some("-h" | "--help" | "help") => {
            print!("{}", install::USAGE);
            ExitCode::SUCCESS
        }
        Some("-V" | "--version") => {
            println!("mesh-cni {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(cmd @ ("install" | "uninstall")) => match installer(cmd, &args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-cni {cmd}: {e}");
                ExitCode::FAILURE
            }
        },
        Some(other) => {
            eprintln!("mesh-cni: unknown command {other:?}; see mesh-cni --help");
            ExitCode::from(2)
        }
    }
}

fn installer(cmd: &str, args: &[String]) -> Result<(), install::InstallError> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{}", install::USAGE);
        return Ok(());
    }
    let options = install::parse_args(args)?;
    if cmd == "uninstall" {
        for path in install::uninstall(&options.bin_dir, &options.conf_dir)? {
            eprintln!("mesh-cni uninstall: removed mesh-cni from {}", path.display());
        }
        return Ok(());
    }
    let source = std::env::current_exe()
        .map_err(|source| install::InstallError::Io { path: "/proc/self/exe".into(), source })?;
    install::run(&options, &source)
}

fn run_plugin() -> ExitCode {
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin) {
        Ok(n) if n as u64 > MAX_STDIN => Err(CniError::new(
            code::DECODE,
            format!("the network configuration on stdin is larger than {MAX_STDIN} bytes"),
        )),
        Ok(_) => Ok(plugin::run(&|k| std::env::var(k).ok(), &stdin)),
        Err(e) => Err(CniError::new(code::IO, format!("reading stdin: {e}"))),
    };
    let outcome = outcome.unwrap_or_else(|e| plugin::Outcome {
        stdout: error_result(DEFAULT_VERSION, &e),
        stderr: format!("mesh-cni: {e}\n"),
        exit_code: 1,
    });
    print!("{}", outcome.stdout);
    eprint!("{}", outcome.stderr);
    ExitCode::from(outcome.exit_code as u8)
}
