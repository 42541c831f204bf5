//! A harness to bench a driver against its backend's raw client, in one
//! process, the way every anykv driver does in `benches/raw_vs_anykv.rs`.
//!
//! Several [`Side`]s (anykv through `anykv_core::open`, the bare driver, the
//! raw client, …) run the same operations on the same keys of the same
//! server. For each [`Cell`] (an operation at a concurrency) the sides take
//! turns, round after round with the order rotating, so that noise on a
//! shared machine hits every side alike; each round runs a fixed number of
//! operations split over `conc` tasks and records every latency. After one
//! unmeasured warm-up round per side, [`compare`] prints one markdown row per
//! cell: ops/s, p50/p99 latency and the chosen throughput ratios.
//!
//! Anything that implements `anykv_core::Store` is a side already
//! ([`StoreSide`]); a driver author writes only the raw client's side:
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use anykv_core::{Key, Store};
//! use anykv_testkit::bench::{self, BoxFuture, Op, Side, StoreSide};
//!
//! struct Raw {
//!     // client: mystore_client::Client,
//!     keys: Vec<Key>, // bench::keys("<namespace>/"): what anykv writes
//! }
//!
//! impl Side for Raw {
//!     fn run(&self, op: Op, i: usize) -> BoxFuture<'_, ()> {
//!         Box::pin(async move {
//!             let key = self.keys[i].as_str();
//!             // `op` on `key` through the raw client; panic on failure.
//!         })
//!     }
//! }
//!
//! fn main() {
//!     bench::main("MYSTORE_URL", |url| async move {
//!         let kv = bench::open(&url, "bench").await; // with every key written
//!         let raw = Raw { keys: bench::keys("bench/") };
//!         let anykv = StoreSide::new(kv.clone(), "");
//!         let sides: [(&str, Arc<dyn Side>); 2] = [("anykv", Arc::new(anykv)), ("raw", Arc::new(raw))];
//!         let cells = bench::get_put([1_000, 6_400], [500, 6_400]);
//!         bench::compare("anykv-mystore vs mystore-client", &sides, &[(0, 1)], &cells, 4).await;
//!         let _ = kv.delete_prefix(&anykv_core::Prefix::root()).await;
//!     });
//! }
//! ```

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anykv_core::{Bytes, Key, Kv, PutOptions, Store};
pub use futures::future::BoxFuture;

/// How many key names a bench cycles over.
pub const NAMES: usize = 1000;
/// Value size in bytes.
pub const VALUE_LEN: usize = 256;

/// Key name `i` (modulo [`NAMES`]), 8 bytes: `k0000000` … `k0000999`.
pub fn key_name(i: usize) -> String {
    format!("k{:07}", i % NAMES)
}

/// The [`NAMES`] bench keys, each `{prefix}{key_name(i)}`: an empty prefix
/// for a namespaced `Kv`, `"<namespace>/"` for a bare driver or a raw
/// client, which see keys with the namespace. Panics if `prefix` makes
/// invalid keys.
pub fn keys(prefix: &str) -> Vec<Key> {
    (0..NAMES)
        .map(|i| match Key::new(format!("{prefix}{}", key_name(i))) {
            Ok(key) => key,
            Err(e) => panic!("bench key with prefix {prefix:?}: {e}"),
        })
        .collect()
}

/// A value of [`VALUE_LEN`] bytes.
pub fn value() -> Bytes {
    Bytes::from(vec![b'v'; VALUE_LEN])
}

/// The operation a cell measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read an existing key.
    Get,
    /// Overwrite an existing key, unconditionally.
    Put,
}

impl Op {
    /// `"get"` or `"put"`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
        }
    }
}

/// One row of the table: `op` at `conc` concurrent tasks.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    /// The operation.
    pub op: Op,
    /// Concurrent tasks.
    pub conc: usize,
    /// Operations per round and side, split evenly over the tasks (rounded
    /// down to a multiple of `conc`). Pick it so a round lasts well under a
    /// second.
    pub ops: usize,
}

impl Cell {
    /// `ops` operations `op` per round, from `conc` tasks.
    pub const fn new(op: Op, conc: usize, ops: usize) -> Self {
        Self { op, conc, ops }
    }
}

/// The usual cells: get, then put, each at concurrency 1 and 64, with
/// `get` and `put` operations per round at those concurrencies.
pub const fn get_put(get: [usize; 2], put: [usize; 2]) -> [Cell; 4] {
    [
        Cell::new(Op::Get, 1, get[0]),
        Cell::new(Op::Get, 64, get[1]),
        Cell::new(Op::Put, 1, put[0]),
        Cell::new(Op::Put, 64, put[1]),
    ]
}

/// One contender: a client that runs the bench operations.
pub trait Side: Send + Sync + 'static {
    /// One operation `op` on key number `i` (in `0..NAMES`). Panics on
    /// failure: the bench stops with that panic.
    fn run(&self, op: Op, i: usize) -> BoxFuture<'_, ()>;

    /// Whether this side takes part in cells of `op` (default: yes); a side
    /// left out shows `–` in that row.
    fn takes_part(&self, op: Op) -> bool {
        let _ = op;
        true
    }
}

/// Opens `url` through `anykv_core::open` (link the driver, so the registry
/// knows its scheme) scoped to namespace `ns`, and writes the bench
/// [`value`] at every bench key, so that gets find them. Panics on failure.
/// Delete the namespace's keys when done (`delete_prefix(&Prefix::root())`).
pub async fn open(url: &str, ns: &str) -> Kv {
    let scoped = crate::server::with_query(url, &format!("prefix={ns}"));
    let kv = match anykv_core::open(&scoped).await {
        Ok(kv) => kv,
        Err(e) => panic!(
            "bench: cannot open {}: {e}",
            anykv_core::config::redact(url)
        ),
    };
    let side = StoreSide::new(kv.clone(), "");
    for i in 0..NAMES {
        side.run(Op::Put, i).await;
    }
    kv
}

/// A side through any anykv [`Store`]: a `Kv` (anykv as applications use
/// it) or a bare driver (to tell the driver's cost from the layers').
pub struct StoreSide {
    store: Box<dyn Store>,
    keys: Vec<Key>,
    value: Bytes,
}

impl StoreSide {
    /// `store` on the bench [`keys`] with `key_prefix` (`""` for a `Kv`
    /// opened with the bench namespace, `"<namespace>/"` for the bare
    /// driver) and the bench [`value`].
    pub fn new(store: impl Store, key_prefix: &str) -> Self {
        Self {
            store: Box::new(store),
            keys: keys(key_prefix),
            value: value(),
        }
    }
}

impl Side for StoreSide {
    fn run(&self, op: Op, i: usize) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let key = &self.keys[i % NAMES];
            let failed = match op {
                Op::Get => match self.store.get(key).await {
                    Ok(Some(_)) => return,
                    Ok(None) => "not found".to_owned(),
                    Err(e) => e.to_string(),
                },
                Op::Put => {
                    let put = self
                        .store
                        .put(key, self.value.clone(), PutOptions::default());
                    match put.await {
                        Ok(_) => return,
                        Err(e) => e.to_string(),
                    }
                }
            };
            panic!("bench {} {key}: {failed}", op.name());
        })
    }
}

/// Every operation of one side in one cell, over all measured rounds.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    elapsed: Duration,
    /// Latencies in µs, sorted once the cell is done.
    lat_us: Vec<u32>,
}

impl Sample {
    /// Operations measured.
    pub fn ops(&self) -> usize {
        self.lat_us.len()
    }

    /// Throughput: operations over the summed wall time of the rounds.
    pub fn ops_per_s(&self) -> f64 {
        self.ops() as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency percentile in µs, `p` in `0.0..=1.0` (0 without samples).
    pub fn percentile_us(&self, p: f64) -> u32 {
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        self.lat_us.get(i).copied().unwrap_or(0)
    }
}

/// The measurements of one cell: one sample per side, `None` for a side
/// that does not take part.
#[derive(Debug, Clone)]
pub struct Row {
    /// The cell measured.
    pub cell: Cell,
    /// In the order of the sides.
    pub samples: Vec<Option<Sample>>,
}

/// The `main` of a bench binary: runs `bench(url)` with the server URL from
/// env var `var` on a two-worker tokio runtime (the same for every backend,
/// so figures compare). When `var` is unset it says so and measures nothing,
/// so a plain `cargo bench` passes; `cargo xtask bench` starts the servers
/// and sets the variables.
pub fn main<F: Future<Output = ()>>(var: &str, bench: impl FnOnce(String) -> F) {
    let Some(url) = std::env::var(var).ok().filter(|u| !u.is_empty()) else {
        println!(
            "{var} is not set: run `cargo xtask bench` (it starts the server); nothing measured"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    match rt {
        Ok(rt) => rt.block_on(bench(url)),
        Err(e) => panic!("cannot start the tokio runtime: {e}"),
    }
}

/// Runs every cell (warm-up, then `rounds` interleaved rounds per side) and
/// prints `title` (what is compared, on which server), the settings and a
/// markdown table as it goes: ops/s and p50/p99 µs per side, and for each
/// `(a, b)` of `ratios` (indexes into `sides`) the throughput ratio `a/b`
/// (e.g. anykv/raw). Returns the measurements.
pub async fn compare(
    title: &str,
    sides: &[(&str, Arc<dyn Side>)],
    ratios: &[(usize, usize)],
    cells: &[Cell],
    rounds: usize,
) -> Vec<Row> {
    println!("\n{title}: {rounds} interleaved rounds per side and cell,");
    println!("8-byte keys over {NAMES} names, {VALUE_LEN}-byte values\n");
    let name = |s: usize| sides.get(s).map_or("?", |(name, _)| name);
    let mut header = vec!["op".to_owned(), "conc".to_owned()];
    header.extend(sides.iter().map(|(n, _)| format!("{n} ops/s")));
    header.extend(
        ratios
            .iter()
            .map(|&(a, b)| format!("{}/{}", name(a), name(b))),
    );
    header.extend(sides.iter().map(|(n, _)| format!("{n} p50/p99 µs")));
    println!("| {} |", header.join(" | "));
    println!("|{}", "---|".repeat(header.len()));

    let mut rows = Vec::with_capacity(cells.len());
    for &cell in cells {
        let active: Vec<usize> = (0..sides.len())
            .filter(|&s| sides[s].1.takes_part(cell.op))
            .collect();
        for &s in &active {
            round(&sides[s].1, cell).await; // warm connections, caches, allocator
        }
        let mut samples: Vec<Option<Sample>> = (0..sides.len())
            .map(|s| active.contains(&s).then(Sample::default))
            .collect();
        for r in 0..rounds {
            for j in 0..active.len() {
                let s = active[(r + j) % active.len()]; // rotate who goes first
                let (elapsed, lat) = round(&sides[s].1, cell).await;
                if let Some(sample) = &mut samples[s] {
                    sample.elapsed += elapsed;
                    sample.lat_us.extend(lat);
                }
            }
        }
        for sample in samples.iter_mut().flatten() {
            sample.lat_us.sort_unstable();
        }
        let row = Row { cell, samples };
        println!("{}", markdown(&row, ratios));
        rows.push(row);
    }
    rows
}

/// One round: `conc` tasks, each running its share of the cell's operations
/// on keys spread over the names; returns wall time and every latency.
async fn round(side: &Arc<dyn Side>, cell: Cell) -> (Duration, Vec<u32>) {
    let conc = cell.conc.max(1);
    let per = (cell.ops / conc).max(1);
    let started = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|w| {
            let side = side.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let t = Instant::now();
                    side.run(cell.op, (w * 7919 + i) % NAMES).await;
                    lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(per * conc);
    for task in tasks {
        match task.await {
            Ok(lat) => all.extend(lat),
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("bench task did not finish: {e}"),
            },
        }
    }
    (started.elapsed(), all)
}

fn markdown(row: &Row, ratios: &[(usize, usize)]) -> String {
    const NONE: &str = "–";
    let get = |s: usize| row.samples.get(s).and_then(Option::as_ref);
    let mut cols = vec![row.cell.op.name().to_owned(), row.cell.conc.to_string()];
    cols.extend(row.samples.iter().map(|s| match s {
        Some(s) => format!("{:.0}", s.ops_per_s()),
        None => NONE.to_owned(),
    }));
    cols.extend(ratios.iter().map(|&(a, b)| match (get(a), get(b)) {
        (Some(a), Some(b)) => format!("{:.3}", a.ops_per_s() / b.ops_per_s()),
        _ => NONE.to_owned(),
    }));
    cols.extend(row.samples.iter().map(|s| match s {
        Some(s) => format!("{}/{}", s.percentile_us(0.5), s.percentile_us(0.99)),
        None => NONE.to_owned(),
    }));
    format!("| {} |", cols.join(" | "))
}
