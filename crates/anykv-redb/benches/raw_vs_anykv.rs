//! anykv-redb against raw redb, in one process, interleaved.
//!
//! No server: each side gets its own fresh file under cargo's target tmp dir
//! (a real disk, so fsync costs what it costs). Rounds alternate anykv and
//! raw so both see the same machine noise; each cell has a fixed op count
//! per round. 8-byte keys over 1,000 names, 256-byte values.
//!
//! Cells:
//! - get c=1: anykv `get` (through `anykv_core::open`, all layers) vs raw
//!   redb with one read transaction per get, and vs raw redb with every get
//!   of the round in one read transaction;
//! - put c=1: one durable put at a time vs raw one commit per put;
//! - put c=64: 64 concurrent durable puts (anykv group-commits them) vs raw
//!   64 threads each committing its own put.
//!
//! Run with `cargo xtask bench redb` or
//! `cargo bench -p anykv-redb --bench raw_vs_anykv`. Timings are printed,
//! never asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark binary: fail loudly

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anykv_core::{Bytes, Key, Kv, PutOptions, Store};
use anykv_redb::{RedbStore, Settings};
use redb::{Database, ReadableDatabase, TableDefinition};

const RAW: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("raw");
const NAMES: usize = 1000;
const VALUE: usize = 256;
const ROUNDS: usize = 5;
const GETS_PER_ROUND: usize = 200_000;
const PUTS_PER_ROUND: usize = 600;
const CONCURRENCY: usize = 64;
const PUTS_PER_TASK: usize = 60;

fn names() -> Vec<String> {
    (0..NAMES).map(|i| format!("k{i:07}")).collect()
}

/// Latencies (ns) and wall time of one side of one cell, over all rounds.
#[derive(Default)]
struct Side {
    lat: Vec<u64>,
    ops: usize,
    wall: Duration,
}

impl Side {
    fn add(&mut self, lat: Vec<u64>, wall: Duration) {
        self.ops += lat.len();
        self.lat.extend(lat);
        self.wall += wall;
    }

    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64()
    }

    fn pct(&mut self, p: f64) -> f64 {
        self.lat.sort_unstable();
        let i = ((self.lat.len() as f64 - 1.0) * p).round() as usize;
        self.lat.get(i).copied().unwrap_or(0) as f64 / 1000.0
    }
}

struct Cell {
    name: &'static str,
    anykv: Side,
    raw: Side,
    raw_label: &'static str,
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_nanos() as u64)
}

async fn anykv_gets(kv: &dyn Store, keys: &[Key]) -> (Vec<u64>, Duration) {
    let mut lat = Vec::with_capacity(GETS_PER_ROUND);
    let start = Instant::now();
    for i in 0..GETS_PER_ROUND {
        let k = &keys[(i * 7919) % NAMES];
        let t = Instant::now();
        let v = kv.get(k).await.unwrap();
        lat.push(t.elapsed().as_nanos() as u64);
        assert_eq!(v.map(|p| p.value.len()), Some(VALUE));
    }
    (lat, start.elapsed())
}

fn raw_gets_txn_each(db: &Database, names: &[String]) -> (Vec<u64>, Duration) {
    let mut lat = Vec::with_capacity(GETS_PER_ROUND);
    let start = Instant::now();
    for i in 0..GETS_PER_ROUND {
        let k = names[(i * 7919) % NAMES].as_str();
        let (v, ns) = timed(|| {
            let txn = db.begin_read().unwrap();
            let t = txn.open_table(RAW).unwrap();
            t.get(k).unwrap().map(|g| g.value().to_vec())
        });
        lat.push(ns);
        assert_eq!(v.map(|v| v.len()), Some(VALUE));
    }
    (lat, start.elapsed())
}

fn raw_gets_one_txn(db: &Database, names: &[String]) -> (Vec<u64>, Duration) {
    let mut lat = Vec::with_capacity(GETS_PER_ROUND);
    let start = Instant::now();
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(RAW).unwrap();
    for i in 0..GETS_PER_ROUND {
        let k = names[(i * 7919) % NAMES].as_str();
        let (v, ns) = timed(|| t.get(k).unwrap().map(|g| g.value().to_vec()));
        lat.push(ns);
        assert_eq!(v.map(|v| v.len()), Some(VALUE));
    }
    (lat, start.elapsed())
}

async fn anykv_puts(kv: &Kv, keys: &[Key], value: &Bytes) -> (Vec<u64>, Duration) {
    let mut lat = Vec::with_capacity(PUTS_PER_ROUND);
    let start = Instant::now();
    for i in 0..PUTS_PER_ROUND {
        let t = Instant::now();
        kv.put(&keys[i % NAMES], value.clone(), PutOptions::default())
            .await
            .unwrap();
        lat.push(t.elapsed().as_nanos() as u64);
    }
    (lat, start.elapsed())
}

fn raw_put(db: &Database, k: &str, value: &[u8]) {
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(RAW).unwrap();
        t.insert(k, value).unwrap();
    }
    txn.commit().unwrap();
}

fn raw_puts(db: &Database, names: &[String], value: &[u8]) -> (Vec<u64>, Duration) {
    let mut lat = Vec::with_capacity(PUTS_PER_ROUND);
    let start = Instant::now();
    for i in 0..PUTS_PER_ROUND {
        let ((), ns) = timed(|| raw_put(db, &names[i % NAMES], value));
        lat.push(ns);
    }
    (lat, start.elapsed())
}

async fn anykv_puts_concurrent(
    kv: &Kv,
    keys: &Arc<Vec<Key>>,
    value: &Bytes,
) -> (Vec<u64>, Duration) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..CONCURRENCY {
        let (kv, keys, value) = (kv.clone(), keys.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(PUTS_PER_TASK);
            for i in 0..PUTS_PER_TASK {
                let k = &keys[(t * PUTS_PER_TASK + i) % NAMES];
                let s = Instant::now();
                kv.put(k, value.clone(), PutOptions::default())
                    .await
                    .unwrap();
                lat.push(s.elapsed().as_nanos() as u64);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    (lat, start.elapsed())
}

fn raw_puts_concurrent(
    db: &Arc<Database>,
    names: &Arc<Vec<String>>,
    value: &[u8],
) -> (Vec<u64>, Duration) {
    let start = Instant::now();
    let threads: Vec<_> = (0..CONCURRENCY)
        .map(|t| {
            let (db, names, value) = (db.clone(), names.clone(), value.to_vec());
            std::thread::spawn(move || {
                (0..PUTS_PER_TASK)
                    .map(|i| {
                        timed(|| raw_put(&db, &names[(t * PUTS_PER_TASK + i) % NAMES], &value)).1
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let lat = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    (lat, start.elapsed())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cpu}, {cores} cores available, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

fn main() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(tmp).unwrap();
    let dir = tempfile::tempdir_in(tmp).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let names = Arc::new(names());
    let keys: Arc<Vec<Key>> = Arc::new(
        names
            .iter()
            .map(|n| Key::new(n.as_str()).unwrap())
            .collect(),
    );
    let value = Bytes::from(vec![0xabu8; VALUE]);

    let kv = rt
        .block_on(anykv_core::open(&format!(
            "redb://{}",
            dir.path().join("anykv.redb").display()
        )))
        .unwrap();
    // The bare driver on the same file (it shares the engine), to show what
    // the standard layers cost.
    let bare = rt
        .block_on(RedbStore::open(
            dir.path().join("anykv.redb"),
            Settings::default(),
        ))
        .unwrap();
    let raw = Arc::new(Database::create(dir.path().join("raw.redb")).unwrap());
    // Same data on both sides; raw in one transaction, anykv through import.
    {
        let txn = raw.begin_write().unwrap();
        {
            let mut t = txn.open_table(RAW).unwrap();
            for n in names.iter() {
                t.insert(n.as_str(), &value[..]).unwrap();
            }
        }
        txn.commit().unwrap();
        let pairs: Vec<_> = keys
            .iter()
            .map(|k| {
                Ok(anykv_core::KvPair {
                    key: k.clone(),
                    value: value.clone(),
                    version: anykv_core::Version::new(0),
                    create_revision: 0,
                    mod_revision: 0,
                })
            })
            .collect();
        use futures::StreamExt;
        rt.block_on(kv.import(futures::stream::iter(pairs).boxed()))
            .unwrap();
    }

    let mut cells = vec![
        Cell {
            name: "get c=1 (all layers)",
            anykv: Side::default(),
            raw: Side::default(),
            raw_label: "raw: read txn per get",
        },
        Cell {
            name: "get c=1 (all layers)",
            anykv: Side::default(),
            raw: Side::default(),
            raw_label: "raw: all gets in one read txn",
        },
        Cell {
            name: "get c=1 (driver only)",
            anykv: Side::default(),
            raw: Side::default(),
            raw_label: "raw: read txn per get",
        },
        Cell {
            name: "durable put c=1 (all layers)",
            anykv: Side::default(),
            raw: Side::default(),
            raw_label: "raw: commit per put",
        },
        Cell {
            name: "durable put c=64 (all layers)",
            anykv: Side::default(),
            raw: Side::default(),
            raw_label: "raw: 64 threads, commit per put",
        },
    ];
    // Warm-up (page cache, allocator, thread pools), not measured.
    rt.block_on(anykv_gets(&kv, &keys));
    raw_gets_txn_each(&raw, &names);

    for round in 0..ROUNDS {
        // Alternate which side goes first, so neither always gets the warm cache.
        let anykv_first = round % 2 == 0;
        for (i, cell) in cells.iter_mut().enumerate() {
            let run_anykv = |side: &mut Side| {
                let (lat, wall) = match i {
                    0 | 1 => rt.block_on(anykv_gets(&kv, &keys)),
                    2 => rt.block_on(anykv_gets(&bare, &keys)),
                    3 => rt.block_on(anykv_puts(&kv, &keys, &value)),
                    _ => rt.block_on(anykv_puts_concurrent(&kv, &keys, &value)),
                };
                side.add(lat, wall);
            };
            let run_raw = |side: &mut Side| {
                let (lat, wall) = match i {
                    0 | 2 => raw_gets_txn_each(&raw, &names),
                    1 => raw_gets_one_txn(&raw, &names),
                    3 => raw_puts(&raw, &names, &value),
                    _ => raw_puts_concurrent(&raw, &names, &value),
                };
                side.add(lat, wall);
            };
            if anykv_first {
                run_anykv(&mut cell.anykv);
                run_raw(&mut cell.raw);
            } else {
                run_raw(&mut cell.raw);
                run_anykv(&mut cell.anykv);
            }
        }
        eprintln!("round {}/{ROUNDS} done", round + 1);
    }
    rt.block_on(bare.close()).unwrap();
    rt.block_on(kv.close()).unwrap();

    println!();
    println!("anykv-redb vs raw redb 4.6 — {}", machine());
    println!(
        "{ROUNDS} interleaved rounds; keys: 8 bytes over {NAMES} names; values: {VALUE} bytes; \
         files on the disk under target/; puts are durable (fsync per commit)."
    );
    println!();
    println!(
        "| operation | anykv ops/s | anykv p50 / p99 µs | compared with | raw ops/s | raw p50 / p99 µs | anykv / raw |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|");
    for c in &mut cells {
        let (a, r) = (c.anykv.ops_per_s(), c.raw.ops_per_s());
        println!(
            "| {} | {:.0} | {:.1} / {:.1} | {} | {:.0} | {:.1} / {:.1} | {:.2}× |",
            c.name,
            a,
            c.anykv.pct(0.5),
            c.anykv.pct(0.99),
            c.raw_label,
            r,
            c.raw.pct(0.5),
            c.raw.pct(0.99),
            a / r
        );
    }
}
