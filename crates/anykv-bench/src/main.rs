//! # anykv-bench: how anykv's watches scale (issue 13)
//!
//! `cargo xtask bench watch [BACKEND…] [-- OPTIONS]` starts real servers on
//! loopback (through `anykv_servers`) and runs
//! `cargo run --release -p anykv-bench -- watch [BACKEND…] [OPTIONS]` with
//! their URLs (`ANYKV_TEST_ETCD`, `ANYKV_TEST_ZK`, `ANYKV_TEST_CONSUL`),
//! their process ids (`ANYKV_BENCH_<BACKEND>_PID`) and a note on their
//! settings (`ANYKV_BENCH_<BACKEND>_NOTE`). memory and redb need no server.
//! Options: `--sizes 100,1000,10000 --rate 500 --max-put-secs 10
//! --idle-secs 15 --steady-secs 15 --drain-secs 10 --no-raw --out FILE` (see `--help`).
//!
//! ## What a case is
//!
//! For each backend, each N, key and prefix targets, on keys that exist
//! before the watches ("existing") and keys that do not exist yet
//! ("missing"), one **case** runs in a child process of its own (so that
//! memory, sockets and CPU time are the case's alone, and a case that hangs
//! or crashes is killed after `--case-timeout` and reported as a failed row
//! without stopping the bench). Every wait inside a case is bounded too
//! (`--step-timeout` for connecting, pre-creating keys and opening the
//! watches; 10 s per put; `--drain-secs` for late events).
//!
//! The anykv client is two `anykv::open` handles on the same URL and
//! namespace (fresh per case): all N watches on ONE handle (the watcher),
//! the puts on the other (the writer). Watch `i` covers `k/NNNNN` (key
//! target) or `p/NNNNN` (prefix target, whose put goes to `p/NNNNN/x`).
//! Phases, in order:
//!
//! 1. pre-create the N put keys and the baseline's keys (existing cases
//!    only), 32 at a time
//!    (after the case, every key it wrote is deleted one by one, 32 at a
//!    time: see `Names::case_key` on why never as one range);
//! 2. **no-watch put baseline**: the same puts on unwatched keys (the put
//!    keys' shape under `base/`, existing when they do: see
//!    `Names::base_key`) at the writer's pace, no watch open: put latency
//!    p50 / p99. As many as the case's
//!    watched puts (step 7) unless `--base-puts` says otherwise, so that
//!    both p99s come from windows of the same length;
//! 3. **setup**: open the N watches, `--setup-concurrency` (100) at a time,
//!    wall time and client CPU time until the last `watch()` returned (raw
//!    etcd: until the server confirmed every watch with `created`);
//! 4. **memory per watch**: (RSS after setup − RSS before setup) / N, RSS
//!    from `/proc/self/statm`, each read after a 300 ms settle; the
//!    watching handle made one request before, so its connection is not
//!    counted as the watches' (the writer's is in use already). Includes
//!    what the process holds per watch: driver state, streams and the
//!    bench's one consumer (a `select_all` over the N streams). Beside it,
//!    the same of live heap bytes (the counting global allocator): what
//!    the watches hold, without the free memory the allocator keeps, which
//!    RSS also counts (the difference is what setup's transient
//!    allocations left behind);
//! 5. **sockets**: entries of `/proc/self/fd` that are sockets, before and
//!    after setup (both handles included);
//! 6. **idle CPU**: `--idle-secs` with N watches open and no writes, CPU
//!    time (user + system, `/proc/<pid>/stat`, 10 ms ticks) of the client
//!    process and of the server process, per second of wall time. The
//!    server's CPU with no client at all is measured once per backend and
//!    shown above its table; the targets count what the watches add to it.
//!    Two windows, one after the other: the first (`--idle-secs`, 15 s)
//!    starts 300 ms after setup, so it holds the fading aftermath of setup
//!    on the server (Consul 1.8 answers a blocking query whose client went
//!    away when its wait runs out: up to ~10.6 s later) and one renewal of
//!    each Consul query; the second (`--steady-secs`, 15 s) is the steady
//!    cost. It starts once the server has been quiet (≤ 20 ms of CPU in
//!    each of 5 seconds in a row, at most 60 s of waiting): a server keeps
//!    working on its own for a while after the case's writes (the Consul
//!    dev agent burns 30–210 ms/s for ~30 s after 15,000 puts with no
//!    client connected), which is not what watches cost, while watches
//!    that keep it busy never let it be quiet. It holds one renewal of
//!    each Consul query. The targets use the steady window;
//! 7. **delivery**: the writer puts each watched key once, at `--rate`
//!    (500/s) on schedule (up to 64 in flight), for at most
//!    `--max-put-secs` (10 s: 5,000 of 10,000 keys), so "expected" is the
//!    number of puts. "delivered" counts watches whose event for their key
//!    arrived within `--drain-secs` of the last acknowledgement;
//! 8. **delay**: per put, time from the put's acknowledgement (its `put()`
//!    returned) to the first event of that watch, p50 / p99 / max (an event
//!    that arrived before the acknowledgement counts as 0);
//! 9. **put latency with watches open**: send → acknowledgement of those
//!    paced puts, p50 / p99, next to the no-watch baseline of step 2.
//!
//! ## Raw baselines (same servers, same run)
//!
//! - etcd, "raw: 1 stream": etcd-client with all N watches multiplexed on
//!   ONE gRPC watch stream (`WatchStream::watch` with client watch ids);
//!   "raw: stream/watch": one watch stream per watch (one HTTP/2
//!   connection either way);
//! - ZooKeeper, "raw: data watches": one zookeeper-client session with N
//!   one-shot watches (`get_and_watch_data` on existing, `check_and_watch_stat`
//!   on missing znodes) and, for prefix targets, persistent recursive watches;
//! - Consul: no raw baseline (plain HTTP blocking queries would hold one
//!   connection per watch, as the old driver does).
//!
//! Raw cases run key targets (ZooKeeper also prefix targets) and go
//! through the same phases with a raw writer.
//!
//! ## Results
//!
//! `results/before.md` (drivers before the watch rewrites of issue 13) and
//! `results/after.md` (with the rewrites that had landed), each with its
//! `.json`. To measure another commit's drivers on the same kind of
//! servers: build `anykv-bench` from a `git archive` of that commit (plus
//! this crate) and run `ANYKV_BENCH_BIN=/path/to/anykv-bench cargo xtask
//! bench watch -- --label "…"`.
//!
//! ## Reading the numbers
//!
//! The machine is a shared 2-core VM: wall times are noisy, so setup and
//! the put phase also report client CPU time. The summary table checks the
//! issue's targets on the anykv rows at the largest N each backend ran.

mod case;
mod layers;
mod measure;
mod mirror;
mod report;
mod sides;
mod spec;

use std::{
    io::Read,
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::{
    report::{BackendInfo, Row},
    spec::{CaseResult, CaseSpec, Kind, Side},
};

/// Backends in the order they run.
const BACKENDS: &[&str] = &["memory", "redb", "etcd", "zookeeper", "consul"];

/// Line prefix of a child's result on its stdout.
const RESULT: &str = "ANYKV-BENCH-RESULT ";

#[derive(Parser)]
#[command(about = "anykv watch-scale benchmark (run through `cargo xtask bench watch`)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every case for the given backends (default: all), tables on stdout.
    Watch(WatchArgs),
    /// One case (internal: the parent runs each case in a child process).
    #[command(hide = true)]
    Case {
        /// The case, as JSON.
        spec: String,
    },
    /// What a mirror of a large prefix costs, per backend (see `mirror.rs`).
    Mirror {
        /// Backends: memory, redb, etcd, zookeeper, consul (default: all).
        backends: Vec<String>,
        /// Keys in the mirrored prefix.
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
    },
    /// What each layer of a `Kv` costs per operation (see `layers.rs`).
    Layers(layers::LayersArgs),
    /// One mirror case (internal: a child process per backend).
    #[command(hide = true)]
    MirrorCase {
        /// Backend name.
        backend: String,
        /// Its URL.
        url: String,
        /// Keys in the mirrored prefix.
        keys: usize,
    },
}

#[derive(clap::Args)]
struct WatchArgs {
    /// Backends: memory, redb, etcd, zookeeper, consul (default: all).
    backends: Vec<String>,
    /// Numbers of watches.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    sizes: Vec<usize>,
    /// Writer pace, puts per second.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// At most this many seconds of puts per case (10,000 watches at 500/s: 5,000 puts).
    #[arg(long, default_value_t = 10.0)]
    max_put_secs: f64,
    /// Idle window of the CPU figures, seconds. Longer than Consul's
    /// 10 s blocking wait, so each of its queries is renewed once in it,
    /// and setup's aftermath (queries the agent still holds) fades.
    #[arg(long, default_value_t = 15.0)]
    idle_secs: f64,
    /// A second idle window right after the first, seconds (0: none): the
    /// steady cost, once what setup left on the server (queries it still
    /// holds for a client gone) has ended. The idle targets use it, so
    /// with 0 they show as not measured ("–", not met).
    #[arg(long, default_value_t = 15.0)]
    steady_secs: f64,
    /// Wait for late events after the last put, seconds.
    #[arg(long, default_value_t = 10.0)]
    drain_secs: f64,
    /// Watches opened at once during setup.
    #[arg(long, default_value_t = 100)]
    setup_concurrency: usize,
    /// Puts of the no-watch latency baseline, made again on other
    /// unwatched keys while the watches are open (default: as many as the
    /// watched puts of the case, at the same pace, so that the p99s come
    /// from windows of the same length: a longer window meets more of the
    /// machine's stalls).
    #[arg(long)]
    base_puts: Option<usize>,
    /// Bound of connecting, pre-creating keys and opening the watches, seconds.
    #[arg(long, default_value_t = 120.0)]
    step_timeout: f64,
    /// A case still running after this many seconds is killed (failed row).
    #[arg(long, default_value_t = 300.0)]
    case_timeout: f64,
    /// Skip the raw client baselines.
    #[arg(long)]
    no_raw: bool,
    /// Also write the markdown to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write every case (spec and result) as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// What code is measured, for the header (default: the HEAD commit of
    /// the current directory's repository).
    #[arg(long)]
    label: Option<String>,
}

/// Counts live heap bytes, for figures the machine's noise does not move
/// (the mirror bench's bytes per key), over a wrapper that counts
/// allocations and bytes allocated (the layers bench's allocs/op).
#[global_allocator]
static ALLOC: cap::Cap<&stats_alloc::StatsAlloc<std::alloc::System>> =
    cap::Cap::new(&stats_alloc::INSTRUMENTED_SYSTEM, usize::MAX);

/// Allocations and bytes allocated so far, process-wide.
fn alloc_stats() -> (usize, usize) {
    let s = stats_alloc::INSTRUMENTED_SYSTEM.stats();
    (s.allocations + s.reallocations, s.bytes_allocated)
}

/// Heap bytes allocated and not yet freed, process-wide.
fn heap_bytes() -> usize {
    ALLOC.allocated()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::Watch(args) => watch(args),
        Cmd::Case { spec } => child(&spec),
        Cmd::Mirror { backends, keys } => mirror_bench(backends, keys),
        Cmd::MirrorCase { backend, url, keys } => mirror::case(&backend, &url, keys),
        Cmd::Layers(args) => layers::run(args),
    };
    match out {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("anykv-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one case and prints its result line.
fn child(spec: &str) -> Result<()> {
    let spec: CaseSpec = serde_json::from_str(spec).context("case spec")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(case::run(&spec));
    println!("{RESULT}{}", serde_json::to_string(&result)?);
    // Whatever the drivers still run in the background must not delay the exit.
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// The mirror bench over the backends' servers (as for `watch`).
fn mirror_bench(backends: Vec<String>, keys: usize) -> Result<()> {
    let backends = if backends.is_empty() {
        ["memory", "redb", "etcd", "zookeeper", "consul"]
            .map(str::to_owned)
            .to_vec()
    } else {
        backends
    };
    let dir = tempfile::tempdir()?;
    mirror::run(&backends, keys, |b| {
        server(b, &dir.path().join(format!("{b}.redb"))).url
    })
}

/// Where a backend's server is, from the environment xtask sets.
struct Server {
    url: Option<String>,
    pid: Option<u32>,
    note: String,
}

fn server(backend: &str, redb_dir: &std::path::Path) -> Server {
    let upper = backend.to_uppercase();
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let pid = env(&format!("ANYKV_BENCH_{upper}_PID")).and_then(|p| p.parse().ok());
    let note = env(&format!("ANYKV_BENCH_{upper}_NOTE"));
    match backend {
        "memory" => Server {
            url: Some("memory://anykv-bench".into()),
            pid: None,
            note: "in process".into(),
        },
        "redb" => Server {
            url: Some(format!("redb://{}", redb_dir.display())),
            pid: None,
            note: "in process, a fresh file per case under a temp dir".into(),
        },
        _ => {
            let var = match backend {
                "etcd" => "ANYKV_TEST_ETCD",
                "zookeeper" => "ANYKV_TEST_ZK",
                _ => "ANYKV_TEST_CONSUL",
            };
            let url = env(var);
            Server {
                note: note.unwrap_or_else(|| match &url {
                    Some(u) => format!("{u} (settings unknown: not started by xtask)"),
                    None => format!("no server: {var} unset (run `cargo xtask bench watch`)"),
                }),
                url,
                pid,
            }
        }
    }
}

fn watch(args: WatchArgs) -> Result<()> {
    for b in &args.backends {
        if !BACKENDS.contains(&b.as_str()) {
            bail!("unknown backend {b}; known: {}", BACKENDS.join(", "));
        }
    }
    let redb = tempfile::Builder::new()
        .prefix("anykv-bench-watch-")
        .tempdir()?;
    let mut infos = Vec::new();
    let mut rows = Vec::new();
    let run_id = std::process::id();
    let mut next = 0usize;
    for backend in BACKENDS {
        if !args.backends.is_empty() && !args.backends.iter().any(|b| b == backend) {
            continue;
        }
        let srv = server(backend, redb.path());
        let server_idle = srv.pid.and_then(|pid| {
            let (a, t) = (measure::cpu_ms(Some(pid))?, Instant::now());
            std::thread::sleep(Duration::from_secs_f64(args.idle_secs));
            Some((measure::cpu_ms(Some(pid))? - a) / t.elapsed().as_secs_f64())
        });
        infos.push(BackendInfo {
            name: backend.to_string(),
            note: srv.note.clone(),
            server_idle,
        });
        for spec in cases(&args, backend) {
            next += 1;
            let mut spec = spec;
            spec.ns = format!("wb-{run_id}-{next}");
            spec.server_pid = srv.pid;
            spec.url = match (&srv.url, *backend) {
                (Some(u), "redb") => format!("{u}/case-{next}.redb"),
                (Some(u), _) => u.clone(),
                (None, _) => String::new(),
            };
            let started = Instant::now();
            let result = if srv.url.is_none() {
                CaseResult {
                    error: Some(srv.note.clone()),
                    ..CaseResult::default()
                }
            } else {
                run_child(&spec, Duration::from_secs_f64(args.case_timeout))
            };
            let row = Row {
                spec,
                result,
                secs: started.elapsed().as_secs_f64(),
            };
            progress(&row);
            rows.push(row);
        }
    }

    let mut out = header(&args);
    for info in &infos {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| r.spec.backend == info.name)
            .collect();
        report::table(&mut out, info, &mine);
    }
    report::summary(&mut out, &infos, &rows);
    print!("{out}");
    if let Some(path) = &args.out {
        std::fs::write(path, &out).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The cases of one backend: anykv for every N × target × existence, then
/// the raw baselines.
fn cases(args: &WatchArgs, backend: &str) -> Vec<CaseSpec> {
    let base = |side, n, kind, existing| {
        let mut spec = CaseSpec {
            backend: backend.to_owned(),
            side,
            url: String::new(),
            server_pid: None,
            ns: String::new(),
            n,
            kind,
            existing,
            rate: args.rate,
            max_put_secs: args.max_put_secs,
            idle_secs: args.idle_secs,
            steady_secs: args.steady_secs,
            drain_secs: args.drain_secs,
            setup_concurrency: args.setup_concurrency,
            // Set below: the default depends on the case's own puts.
            base_puts: 0,
            step_timeout_secs: args.step_timeout,
        };
        spec.base_puts = args.base_puts.unwrap_or_else(|| spec.puts());
        spec
    };
    let mut out = Vec::new();
    for &n in &args.sizes {
        for kind in [Kind::Key, Kind::Prefix] {
            for existing in [true, false] {
                out.push(base(Side::Anykv, n, kind, existing));
            }
        }
        if args.no_raw {
            continue;
        }
        match backend {
            // etcd watches do not depend on the key existing.
            "etcd" => {
                out.push(base(Side::EtcdOneStream, n, Kind::Key, false));
                out.push(base(Side::EtcdStreamPerWatch, n, Kind::Key, false));
            }
            "zookeeper" => {
                out.push(base(Side::ZkRaw, n, Kind::Key, true));
                out.push(base(Side::ZkRaw, n, Kind::Key, false));
                out.push(base(Side::ZkRaw, n, Kind::Prefix, false));
            }
            _ => {}
        }
    }
    out
}

/// Runs a case in a child process, killed after `timeout`.
fn run_child(spec: &CaseSpec, timeout: Duration) -> CaseResult {
    let failed = |e: String| CaseResult {
        error: Some(e),
        ..CaseResult::default()
    };
    let json = match serde_json::to_string(spec) {
        Ok(j) => j,
        Err(e) => return failed(e.to_string()),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return failed(e.to_string()),
    };
    let mut child = match Command::new(exe)
        .args(["case", &json])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return failed(format!("spawning the case: {e}")),
    };
    // Read stdout on a thread so that a full pipe never blocks the child.
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut o) = stdout {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let text = reader.join().unwrap_or_default();
    let parsed = text
        .lines()
        .find_map(|l| l.strip_prefix(RESULT))
        .and_then(|j| serde_json::from_str::<CaseResult>(j).ok());
    match (parsed, status) {
        (Some(r), _) => r,
        (None, None) => failed(format!("case killed after {timeout:?}")),
        (None, Some(s)) => failed(format!("case exited ({s}) without a result")),
    }
}

fn progress(row: &Row) {
    let (s, r) = (&row.spec, &row.result);
    eprintln!(
        "anykv-bench: {} {} N={} {:?} {} — setup {:?} ms, delivered {}/{}, delay {:?}, B/watch {:?} (heap {:?}), {:.0} s{}",
        s.backend,
        s.side.label(),
        s.n,
        s.kind,
        if s.existing { "existing" } else { "missing" },
        r.setup_ms.map(|v| v.round()),
        r.delivered,
        r.expected,
        r.delay,
        r.rss_per_watch.map(|v| v.round()),
        r.heap_per_watch.map(|v| v.round()),
        row.secs,
        r.error
            .as_deref()
            .map(|e| format!(" FAILED: {e}"))
            .unwrap_or_default(),
    );
}

/// What a bench report's header says of the run: the code measured, when,
/// and the machine's state.
pub(crate) struct RunInfo {
    pub code: String,
    pub date: String,
    pub load: String,
    pub cpus: usize,
}

impl RunInfo {
    /// `label`, or the HEAD commit of the current directory's repository.
    pub(crate) fn now(label: Option<&str>) -> RunInfo {
        let run = |cmd: &str, a: &[&str]| {
            Command::new(cmd)
                .args(a)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        let code = match label {
            Some(label) => label.to_owned(),
            None => format!(
                "HEAD `{}` (plus uncommitted work of the tree)",
                run("git", &["log", "-1", "--format=%h %s"])
            ),
        };
        RunInfo {
            code,
            date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            load: std::fs::read_to_string("/proc/loadavg").unwrap_or_default(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        }
    }
}

/// Title, run parameters and machine state.
fn header(args: &WatchArgs) -> String {
    let RunInfo {
        code,
        date,
        load,
        cpus,
    } = RunInfo::now(args.label.as_deref());
    format!(
        "# anykv watch bench\n\n\
         Run {date}; code: {code}; release build. \
         {cpus} CPUs, load average at the end {}.\n\n\
         Parameters: N = {:?}, one put per watched key at {} puts/s for at most {} s, \
         idle windows {} s after setup then {} s steady, drain {} s, setup concurrency {}, no-watch puts (and as many on other unwatched keys with the watches open and idle): {}, \
         case timeout {} s. Times in ms; KiB/watch = (RSS after setup − before) / N, and in brackets the same of live heap bytes (a counting allocator: what the watches hold, without the allocator's free memory). \
         See `crates/anykv-bench/src/main.rs` for how each figure is measured.\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        args.sizes,
        args.rate,
        args.max_put_secs,
        args.idle_secs,
        args.steady_secs,
        args.drain_secs,
        args.setup_concurrency,
        match args.base_puts {
            Some(n) => n.to_string(),
            None => "as many as the watched puts, same pace, same key shape (existing when the watched keys exist)".into(),
        },
        args.case_timeout,
    )
}
