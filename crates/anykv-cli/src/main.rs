//! `anykv`: one command-line tool for every anykv backend.
//!
//! `anykv [--url URL] <command>`; the URL comes from `--url`, else
//! `ANYKV_URL`, else `redb://anykv.redb` in the current directory. See
//! `anykv --help` for the commands and the exit-code table.
//!
//! Flow: clap parses ([`cli`]), the arguments are checked into a plan
//! without touching any store ([`commands::plan`]), and the plan runs on a
//! tokio runtime. Every failure is a [`exit::Failure`]: one line on stderr
//! and an exit code from the table.

mod child;
mod cli;
mod commands;
mod coord;
mod copy;
mod dump;
mod dumpfile;
mod exit;
mod lock;
mod output;
mod restore;
mod signals;

use std::{process::ExitCode, time::Duration};

use clap::Parser;

use crate::exit::Failure;

/// How long shutdown waits for the runtime's leftover blocking work (a
/// driver's writer thread finishing a flush) before exiting anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    // Usage errors and --help/--version are printed and exited by clap
    // (usage errors with exit code 2).
    let cli = cli::Cli::parse();
    init_tracing();
    let code = match run(cli) {
        Ok(code) => code,
        Err(failure) => {
            if let Some(message) = &failure.message {
                eprintln!("{message}");
            }
            failure.code
        }
    };
    ExitCode::from(code)
}

fn run(cli: cli::Cli) -> Result<u8, Failure> {
    let plan = commands::plan(cli.command)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::FAILURE, format!("cannot start the runtime: {e}")))?;
    let outcome = runtime.block_on(commands::run(cli.url, plan));
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    outcome
}

/// Logs to stderr only when asked with `ANYKV_LOG` (e.g. `ANYKV_LOG=debug`
/// shows every operation with backend, key, outcome and latency).
fn init_tracing() {
    let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("ANYKV_LOG") else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
