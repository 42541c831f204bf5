//! Markdown output: one table per backend, then the targets of issue 13.

use std::fmt::Write;

use crate::spec::{CaseResult, CaseSpec, Kind, Side};

/// One finished case.
#[derive(serde::Serialize)]
pub struct Row {
    /// What was run.
    pub spec: CaseSpec,
    /// What it measured (or why it failed).
    pub result: CaseResult,
    /// Wall seconds of the child process.
    pub secs: f64,
}

/// What the parent knows about one backend's server.
pub struct BackendInfo {
    /// Backend name.
    pub name: String,
    /// How the server runs (settings that differ from its defaults).
    pub note: String,
    /// Server CPU ms/s with no client connected, over the idle window.
    pub server_idle: Option<f64>,
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".to_owned(), ms)
}

fn triple(v: Option<(f64, f64, f64)>) -> String {
    v.map_or("–".to_owned(), |(a, b, c)| {
        format!("{} / {} / {}", ms(a), ms(b), ms(c))
    })
}

fn pair(v: Option<(f64, f64, f64)>) -> String {
    v.map_or("–".to_owned(), |(a, b, _)| {
        format!("{} / {}", ms(a), ms(b))
    })
}

fn kib(v: Option<f64>) -> String {
    v.map_or("–".to_owned(), |b| format!("{:.2}", b / 1024.0))
}

fn kind(k: Kind) -> &'static str {
    match k {
        Kind::Key => "key",
        Kind::Prefix => "prefix",
    }
}

/// Shortens an error for a table cell.
fn short(e: &str) -> String {
    let one_line = e.replace(['\n', '|'], " ");
    if one_line.chars().count() > 160 {
        format!("{}…", one_line.chars().take(160).collect::<String>())
    } else {
        one_line
    }
}

/// The table of one backend.
pub fn table(out: &mut String, info: &BackendInfo, rows: &[&Row]) {
    let _ = writeln!(out, "\n## {}\n", info.name);
    let _ = writeln!(out, "Server: {}.", info.note);
    if let Some(idle) = info.server_idle {
        let _ = writeln!(
            out,
            "Server CPU with no client (idle baseline): {} ms/s.",
            ms(idle)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| client | N | target | keys | setup ms (CPU ms) | delivered | delay p50 / p99 / max ms | KiB/watch RSS (live heap) | sockets before→after | idle CPU ms/s client / server: after setup; steady (server with no watch, before setup) | put p50 / p99 ms, no watch | put p50 / p99 ms, unwatched keys, watches open | put p50 / p99 ms, watched keys | notes |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for row in rows {
        let (s, r) = (&row.spec, &row.result);
        let mut notes = Vec::new();
        if let Some(e) = &r.error {
            notes.push(format!("**FAILED**: {}", short(e)));
        }
        if r.watch_errors > 0 {
            let first = r.first_watch_error.as_deref().unwrap_or("");
            notes.push(format!(
                "{} watch errors ({})",
                r.watch_errors,
                short(first)
            ));
        }
        if r.extra_events > 0 {
            notes.push(format!("{} extra events", r.extra_events));
        }
        if r.put_failures > 0 {
            notes.push(format!("{} puts failed", r.put_failures));
        }
        if r.expected > 0 {
            let pace = r.expected as f64 / r.put_secs.max(1e-9);
            if pace < s.rate * 0.9 {
                notes.push(format!("pace held {pace:.0}/s"));
            }
            notes.push(format!(
                "{} puts in {:.1} s, client CPU {} ms",
                r.expected,
                r.put_secs,
                opt(r.put_cpu_ms)
            ));
        }
        if let Some(q) = r.quiet_after_secs {
            notes.push(format!(
                "steady window after {q:.0} s of waiting for a quiet server"
            ));
        }
        notes.push(format!("case {:.0} s", row.secs));
        let setup = match (r.setup_ms, r.setup_cpu_ms) {
            (Some(w), Some(c)) => format!("{} ({})", ms(w), ms(c)),
            (Some(w), None) => ms(w),
            _ => "–".to_owned(),
        };
        let delivered = if r.expected > 0 {
            format!("{}/{}", r.delivered, r.expected)
        } else {
            "–".to_owned()
        };
        let sockets = if r.setup_ms.is_some() {
            format!("{}→{}", r.sockets.0, r.sockets.1)
        } else {
            "–".to_owned()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {}; {} / {} | {} | {} | {} | {} |",
            s.side.label(),
            s.n,
            kind(s.kind),
            if s.existing { "existing" } else { "missing" },
            setup,
            delivered,
            triple(r.delay),
            match r.heap_per_watch {
                Some(_) => format!("{} ({})", kib(r.rss_per_watch), kib(r.heap_per_watch)),
                None => kib(r.rss_per_watch),
            },
            sockets,
            opt(r.idle_client_cpu),
            opt(r.idle_server_cpu),
            opt(r.steady_client_cpu),
            match r.control_server_cpu {
                Some(c) => format!("{} ({})", opt(r.steady_server_cpu), ms(c)),
                None => opt(r.steady_server_cpu),
            },
            pair(r.base_put),
            pair(r.idle_put),
            pair(r.put),
            notes.join("; "),
        );
    }
}

/// Consul's connection bound: anykv-consul's `max_conns` default (32 HTTP
/// connections per handle; the watches share them).
const CONSUL_BOUND: f64 = 32.0;

/// Sockets a setup opened; checked against the bound on Consul.
fn sockets(backend: &str, v: Option<f64>) -> String {
    match v {
        None => "–".to_owned(),
        Some(v) if backend == "consul" && v <= CONSUL_BOUND => {
            format!("{v:.0} ✓ (≤ {CONSUL_BOUND})")
        }
        Some(v) if backend == "consul" => format!("{v:.0} ✗ (> {CONSUL_BOUND})"),
        Some(v) => format!("{v:.0}"),
    }
}

/// Pass/fail of the targets for each backend and N, from its anykv rows.
pub fn summary(out: &mut String, infos: &[BackendInfo], rows: &[Row]) {
    let _ = writeln!(out, "\n## Targets (anykv rows, per backend and N)\n");
    let _ = writeln!(
        out,
        "| backend | N | all delivered | max KiB/watch (< 2) | max delay p99 ms (< 10) | max setup ms (< 1000) | max steady idle CPU ms/s client / server above the same window with no watch (< 10) | max put p99 of unwatched keys, watches open / no-watch p99 (≤ 2×) | max put p99 of watched keys / no-watch p99 (no target) | max sockets opened by setup |"
    );
    let _ = writeln!(out, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for info in infos {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| r.spec.backend == info.name && r.spec.side == Side::Anykv)
            .collect();
        let mut sizes: Vec<usize> = mine.iter().map(|r| r.spec.n).collect();
        sizes.dedup();
        for n in sizes {
            let at: Vec<&CaseResult> = mine
                .iter()
                .filter(|r| r.spec.n == n)
                .map(|r| &r.result)
                .collect();
            summary_row(out, info, n, &at);
        }
    }
}

fn summary_row(out: &mut String, info: &BackendInfo, n: usize, at: &[&CaseResult]) {
    let max =
        |f: &dyn Fn(&CaseResult) -> Option<f64>| at.iter().filter_map(|r| f(r)).reduce(f64::max);
    let failed = at.iter().filter(|r| r.error.is_some()).count();
    let undelivered: u64 = at
        .iter()
        .map(|r| r.expected - r.delivered.min(r.expected))
        .sum();
    let all = failed == 0 && undelivered == 0 && at.iter().all(|r| r.expected > 0);
    let mark = |v: Option<f64>, limit: f64| match v {
        Some(v) if v < limit => format!("{} ✓", ms(v)),
        Some(v) => format!("{} ✗", ms(v)),
        None => "– ✗".to_owned(),
    };
    // The target: other writes on the same server while the
    // watches are open. A put that each fires a watch also pays for the
    // delivery (on Consul the agent answers a blocking query per put);
    // reported beside it, with no target.
    let ratio = match max(&|r| Some(r.idle_put?.1 / r.base_put?.1)) {
        Some(v) if v <= 2.0 => format!("{v:.2}× ✓"),
        Some(v) => format!("{v:.2}× ✗"),
        None => "– ✗".to_owned(),
    };
    let watched = match max(&|r| Some(r.put?.1 / r.base_put?.1)) {
        Some(v) => format!("{v:.2}×"),
        None => "–".to_owned(),
    };
    let idle = format!(
        "{} / {}",
        mark(max(&|r| r.steady_client_cpu), 10.0),
        if info.name == "memory" || info.name == "redb" {
            "n/a".to_owned()
        } else {
            // What the watches cost the server: above what it burned in
            // the same window with no watch open (the case's control; the
            // run's no-client idle if the case has none). The Consul dev
            // agent alone: 12-16 ms/s, more for a while after writes.
            let base = info.server_idle.unwrap_or(0.0);
            mark(
                max(&|r| {
                    let control = r.control_server_cpu.unwrap_or(base);
                    r.steady_server_cpu.map(|c| (c - control).max(0.0))
                }),
                10.0,
            )
        }
    );
    let delivered = if all {
        "yes ✓".to_owned()
    } else {
        format!(
            "no ✗ ({failed} of {} cases failed, {undelivered} events missing)",
            at.len()
        )
    };
    // Only cases whose setup finished have an "after" socket count.
    let opened = max(&|r| {
        r.setup_ms?;
        Some(r.sockets.1 as f64 - r.sockets.0 as f64)
    });
    let _ = writeln!(
        out,
        "| {} | {n} | {delivered} | {} | {} | {} | {idle} | {ratio} | {watched} | {} |",
        info.name,
        mark(max(&|r| r.rss_per_watch.map(|b| b / 1024.0)), 2.0),
        mark(max(&|r| r.delay.map(|d| d.1)), 10.0),
        mark(max(&|r| r.setup_ms), 1000.0),
        sockets(&info.name, opened),
    );
}
