//! One row per scenario run, and the table they print as.

use std::{fmt::Write as _, time::Duration};

use crate::scenario::Scenario;

/// What one scenario run measured, and what broke the contract.
#[derive(Debug, Default, Clone)]
pub struct Row {
    /// "etcd×3 partition".
    pub scenario: String,
    /// Acknowledged writes, and writes with an unknown outcome.
    pub acked: usize,
    /// Writes that timed out or lost their connection.
    pub unknown: usize,
    /// Acknowledged writes missing from the store.
    pub lost: usize,
    /// Watch events delivered.
    pub events: usize,
    /// Invented, duplicated, out-of-order and never-delivered events.
    pub invented: usize,
    /// See [`Row::invented`].
    pub duplicates: usize,
    /// See [`Row::invented`].
    pub out_of_order: usize,
    /// See [`Row::invented`].
    pub missing: usize,
    /// Operations on the shared keys, and whether their history is
    /// linearizable.
    pub shared_ops: usize,
    /// See [`Row::shared_ops`].
    pub linearizable: Option<bool>,
    /// The longest operation, and how many outlived their deadline.
    pub max_latency: Duration,
    /// See [`Row::max_latency`].
    pub over_bound: usize,
    /// From the heal to the first acknowledged write.
    pub recovery: Option<Duration>,
    /// From the fault to the watch's `Err(Unavailable)` (single servers).
    pub watch_signal: Option<Duration>,
    /// Fenced-counter increments, and stale holders fenced off.
    pub lock_increments: u64,
    /// See [`Row::lock_increments`].
    pub lock_fenced: u64,
    /// From a lock holder's death or freeze to the next holder.
    pub handover: Option<Duration>,
    /// Everything that broke the contract.
    pub violations: Vec<String>,
}

impl Row {
    /// An empty row for `sc`.
    pub fn new(sc: &Scenario) -> Row {
        Row {
            scenario: sc.name(),
            ..Row::default()
        }
    }

    /// Records a violation.
    pub fn violation(&mut self, what: impl Into<String>) {
        self.violations.push(what.into());
    }

    /// A row for a scenario that could not run at all.
    pub fn failed(sc: &Scenario, error: &anyhow::Error) -> Row {
        let mut row = Row::new(sc);
        row.violation(format!("the scenario failed to run: {error:#}"));
        row
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2}s", d.as_secs_f64()))
        .unwrap_or_else(|| "-".into())
}

/// The table of `rows`, then each row's violations.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<26} {:>6} {:>5} {:>4} {:>6} {:>13} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  verdict",
        "scenario",
        "acked",
        "unkn",
        "lost",
        "events",
        "inv/dup/ord/miss",
        "lin (ops)",
        "max lat",
        "recovery",
        "watch",
        "lock inc",
        "fenced",
        "handover",
    );
    for r in rows {
        let lin = match r.linearizable {
            Some(true) => format!("yes ({})", r.shared_ops),
            Some(false) => format!("NO ({})", r.shared_ops),
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<26} {:>6} {:>5} {:>4} {:>6} {:>16} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  {}",
            r.scenario,
            r.acked,
            r.unknown,
            r.lost,
            r.events,
            format!(
                "{}/{}/{}/{}",
                r.invented, r.duplicates, r.out_of_order, r.missing
            ),
            lin,
            secs(Some(r.max_latency)),
            secs(r.recovery),
            secs(r.watch_signal),
            r.lock_increments,
            r.lock_fenced,
            secs(r.handover),
            if r.violations.is_empty() {
                "ok".to_owned()
            } else {
                format!("{} VIOLATION(S)", r.violations.len())
            },
        );
    }
    for r in rows.iter().filter(|r| !r.violations.is_empty()) {
        let _ = writeln!(out, "\n{}:", r.scenario);
        for v in &r.violations {
            let _ = writeln!(out, "  - {v}");
        }
    }
    out
}
