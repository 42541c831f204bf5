//! The anykv conformance suite.
//!
//! One entry point runs every scenario against a driver; every driver of
//! anykv runs it unchanged, and so can a third-party driver:
//!
//! ```no_run
//! # async fn demo() {
//! // In your driver crate's tests/conformance.rs:
//! // use my_driver as _; // link the driver so its registration is seen
//! let Some(url) = anykv_testkit::server_url("MY_STORE_URL") else { return };
//! anykv_testkit::run_url("mystore", &url).await;
//! # }
//! ```
//!
//! Each scenario gets its own namespace (a fresh, isolated view of the store),
//! runs in its own task (a panic fails that scenario only) under a time
//! limit, and the run prints how many scenarios it executed. A scenario that
//! needs a capability the driver does not declare asserts that the operation
//! fails with `Error::Unsupported` instead, so it still counts as executed.
//! The run panics if any scenario failed or if none ran.
//!
//! Besides the suite: [`server`] helps a driver's own tests against a real
//! server, [`liveness`] checks liveness reporting, [`proxy`] is a TCP fault
//! proxy (the fault suite's and the drivers' outage tests), and
//! [`bench`](mod@bench) is the harness of every driver's `raw_vs_anykv`
//! benchmark (anykv vs the raw client, interleaved, in one process).

pub mod bench;
pub mod embedded;
pub mod liveness;
pub mod proxy;
mod scenarios;
pub mod server;
mod support;

use std::{sync::Arc, time::Duration};

use anykv_core::{Kv, Prefix};
use futures::future::BoxFuture;

pub use support::Ctx;

/// A scenario: a name and an async test over a fresh namespace.
pub struct Scenario {
    /// Area, e.g. `"watch"`.
    pub area: &'static str,
    /// Name, e.g. `"replay_from_revision"`.
    pub name: &'static str,
    /// The test; panics on failure.
    pub run: fn(Ctx) -> BoxFuture<'static, ()>,
}

/// Every scenario of the suite, grouped by area.
pub fn scenarios() -> Vec<Scenario> {
    scenarios::all()
}

/// Outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Scenarios executed.
    pub executed: usize,
    /// Scenarios that passed.
    pub passed: usize,
    /// `area/name: message` of each failure.
    pub failures: Vec<String>,
}

/// Env var that makes [`server_url`] fail instead of skipping.
pub const REQUIRE_SERVERS: &str = "ANYKV_REQUIRE_SERVERS";

/// The URL of a test server from env var `var`.
///
/// Returns `None` with a printed reason when it is unset, so plain
/// `cargo test` skips server tests; panics when `ANYKV_REQUIRE_SERVERS=1`
/// (set by `cargo xtask test`), so a missing server fails the run.
pub fn server_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let required = std::env::var(REQUIRE_SERVERS).is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{var} is not set but {REQUIRE_SERVERS}=1: the server for this test was not started"
            );
            eprintln!("skipping: {var} is not set (run `cargo xtask test` to start real servers)");
            None
        }
    }
}

/// Opens `base_url` (through the registry: link the driver first) and runs
/// the suite on it. See [`run`].
pub async fn run_url(name: &str, base_url: &str) -> Report {
    let kv = match anykv_core::open(base_url).await {
        Ok(kv) => kv,
        Err(e) => panic!(
            "{name}: cannot open {}: {e}",
            anykv_core::config::redact(base_url)
        ),
    };
    let report = run(name, kv.clone()).await;
    let _ = anykv_core::Store::close(&kv).await;
    report
}

/// Runs every scenario against views of `store`, each in a fresh namespace
/// below `store`'s own, sequentially. Prints one line per failure and a
/// summary; panics if a scenario failed or none ran.
pub async fn run(name: &str, store: Kv) -> Report {
    let run_id = format!("conformance-{:08x}", rand::random::<u32>());
    let base = Arc::new(store);
    let mut report = Report::default();
    for scenario in scenarios() {
        let ns = match Prefix::new(format!("{run_id}/{}-{}", scenario.area, scenario.name)) {
            Ok(ns) => ns,
            Err(e) => panic!("bad scenario namespace: {e}"),
        };
        let cx = Ctx::new(base.clone(), ns, name);
        let task = tokio::spawn((scenario.run)(cx.clone()));
        let outcome = tokio::time::timeout(SCENARIO_LIMIT, task).await;
        report.executed += 1;
        let failure = match outcome {
            Err(_) => Some(format!("timed out after {SCENARIO_LIMIT:?}")),
            Ok(Err(join)) if join.is_panic() => Some(panic_message(join.into_panic())),
            Ok(Err(join)) => Some(format!("task failed: {join}")),
            Ok(Ok(())) => None,
        };
        cx.cleanup().await;
        match failure {
            None => report.passed += 1,
            Some(msg) => {
                eprintln!("{name}: FAILED {}/{}: {msg}", scenario.area, scenario.name);
                report
                    .failures
                    .push(format!("{}/{}: {msg}", scenario.area, scenario.name));
            }
        }
    }
    println!(
        "anykv-testkit[{name}]: {} scenarios executed: {} passed, {} failed",
        report.executed,
        report.passed,
        report.failures.len()
    );
    record(name, &report);
    assert!(report.executed > 0, "{name}: no conformance scenario ran");
    assert!(
        report.failures.is_empty(),
        "{name}: {} of {} conformance scenarios failed:\n  {}",
        report.failures.len(),
        report.executed,
        report.failures.join("\n  ")
    );
    report
}

/// Env var naming a directory where each run records its counts, one file
/// per backend (`<name>.txt`: `executed passed failed`). `cargo xtask test`
/// sets it and fails unless every backend recorded a complete run.
pub const REPORT_DIR: &str = "ANYKV_CONFORMANCE_DIR";

fn record(name: &str, report: &Report) {
    let Ok(dir) = std::env::var(REPORT_DIR) else {
        return;
    };
    let line = format!(
        "{} {} {}\n",
        report.executed,
        report.passed,
        report.failures.len()
    );
    let path = std::path::Path::new(&dir).join(format!("{name}.txt"));
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, line)) {
        panic!(
            "cannot record the conformance report in {}: {e}",
            path.display()
        );
    }
}

/// Time limit of one scenario.
pub const SCENARIO_LIMIT: Duration = Duration::from_secs(90);

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "panic with a non-string payload".to_owned(),
        },
    }
}
