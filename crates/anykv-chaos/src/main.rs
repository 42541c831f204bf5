//! `anykv-chaos`: runs the fault suite (`run`), or one lock worker process
//! of it (`lock-worker`, started by `run`). `cargo xtask chaos` builds and
//! runs it.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anykv_chaos::{
    locks,
    report::{self, Row},
    scenario::{self, Backend, Fault, Settings},
};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "The anykv fault suite against real servers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs scenarios and prints one table; exits 1 on any violation.
    Run {
        /// Only the bounded subset `cargo xtask test` runs.
        #[arg(long)]
        ci: bool,
        /// Only these backends.
        #[arg(long = "backend", value_enum)]
        backends: Vec<Backend>,
        /// Only these faults.
        #[arg(long = "fault", value_enum)]
        faults: Vec<Fault>,
        /// Only single servers (1) or clusters (3).
        #[arg(long)]
        members: Option<usize>,
        /// Runs the whole selection this many times.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Also writes the table to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Extra URL options for every handle, e.g. `consistency=stale` (to
        /// see what a weaker mode costs under faults).
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
    },
    /// One lock worker (started by `run`).
    LockWorker {
        /// The store.
        #[arg(long)]
        url: String,
        /// The worker's name (the lock's owner).
        #[arg(long)]
        name: String,
        /// How long to run.
        #[arg(long)]
        seconds: f64,
        /// The lock's TTL, in seconds.
        #[arg(long)]
        ttl: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("anykv-chaos: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(async move {
        match cli.cmd {
            Cmd::LockWorker {
                url,
                name,
                seconds,
                ttl,
            } => {
                locks::worker(
                    &url,
                    &name,
                    Duration::from_secs_f64(seconds),
                    Duration::from_secs_f64(ttl),
                )
                .await?;
                Ok(true)
            }
            Cmd::Run {
                ci,
                backends,
                faults,
                members,
                runs,
                report,
                options,
            } => {
                let all = if ci {
                    scenario::ci_subset()
                } else {
                    scenario::full_suite()
                };
                let chosen: Vec<_> = all
                    .into_iter()
                    .filter(|s| backends.is_empty() || backends.contains(&s.backend))
                    .filter(|s| faults.is_empty() || faults.contains(&s.fault))
                    .filter(|s| members.is_none_or(|m| m == s.members))
                    .collect();
                anyhow::ensure!(!chosen.is_empty(), "no scenario matches the selection");
                let settings = Settings {
                    url_options: options.join("&"),
                    ..Settings::default()
                };
                run(&chosen, runs, report, &settings).await
            }
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("anykv-chaos: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every scenario `runs` times; true when nothing broke the contract.
async fn run(
    chosen: &[scenario::Scenario],
    runs: usize,
    report_file: Option<PathBuf>,
    settings: &Settings,
) -> anyhow::Result<bool> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()?;
    anykv_servers::stop_all_on_signal()?;
    let ctx = anykv_servers::Ctx::new(root)?;
    let exe = std::env::current_exe()?;
    let mut rows: Vec<Row> = Vec::new();
    for r in 1..=runs {
        for sc in chosen {
            println!("anykv-chaos: run {r}/{runs}: {}", sc.name());
            let row = match scenario::run(&ctx, &exe, *sc, settings).await {
                Ok(row) => row,
                Err(e) => Row::failed(sc, &e),
            };
            println!("{}", report::table(std::slice::from_ref(&row)));
            rows.push(row);
        }
    }
    let table = report::table(&rows);
    let bad = rows.iter().filter(|r| !r.violations.is_empty()).count();
    println!("anykv-chaos: all scenarios\n{table}");
    println!("chaos: {} passed, {bad} failed", rows.len() - bad);
    if let Some(path) = report_file {
        std::fs::write(path, &table)?;
    }
    Ok(bad == 0)
}
