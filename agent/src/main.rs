//! The `keyfence` binary: a thin wrapper over the library.
use std::process::ExitCode;

use clap::Parser as _;
use keyfence::{
    cli::{Cli, Command, LogFormat},
    config,
    daemon::{StartError, run},
    datapath,
};

const EXIT_CONFIG: u8 = 64;

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `keyfence check`: every mistake of the file (and, with `Checked`, of the
/// variables it names for secrets), exit 64; or `FILE: ok`.
fn check(path: &std::path::Path, secrets: config::Secrets) -> ExitCode {
    match config::load_with(path, secrets) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprint!("{errors}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command {
        Command::Check { config, skip_env } => {
            let secrets = if skip_env {
                config::Secrets::Unchecked
            } else {
                config::Secrets::Checked
            };
            check(&config, secrets)
        }
        Command::Status { config, json } => {
            let config = match config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprint!("{errors}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match keyfence::status::read(&config) {
                Ok(status) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&status).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Ok(status) => {
                    print!("{}", keyfence::status::render(&status));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keyfence status: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Detach { config } => {
            let config = match config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprint!("{errors}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match datapath::detach(&config.datapath.pin_path) {
                Ok(report) => {
                    println!(
                        "detached {} link(s), removed {} map pin(s) under {}",
                        report.links.len(),
                        report.maps.len(),
                        config.datapath.pin_path.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keyfence detach: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Fleet(cmd) => keyfence::fleet_cli::run_fleet(cmd),
        Command::Store(cmd) => keyfence::fleet_cli::run_store(cmd),
        Command::Keys(args) => match keyfence::keys_cli::run(&args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("keyfence keys: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            detach_on_exit,
        } => {
            keyfence::sys::tune_allocator();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("keyfence: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(&config, detach_on_exit)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(StartError::Config(errors)) => {
                    eprint!("{errors}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(StartError::Other(e)) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
