//! anykv-zookeeper against the raw zookeeper-client, same server, one process.
//!
//! Run with `cargo xtask bench zookeeper` (starts ZooKeeper and sets
//! ANYKV_TEST_ZK).
//!
//! The raw side sends what anykv sends for these operations: `getData` for a
//! get and `setData` (no expected version) for a put of an existing key, on
//! the same znodes. A third side runs the driver alone, without the layers
//! (namespace, timeout, retry, liveness, tracing), to show where overhead
//! lies. For each cell (get / put × concurrency 1 / 64) the sides take
//! turns, round after round (the order rotating), each round a
//! fixed number of operations on 8-byte keys over 1,000 names with 256-byte
//! values, so noise on a shared machine hits both alike. Prints a markdown
//! table of ops/s, p50/p99 latency and the anykv/raw throughput ratio.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark binary: fail loudly

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anykv_core::{Bytes, Key, Kv, Prefix, PutOptions, Store};
use anykv_zookeeper as _;

const NAMES: usize = 1000;
const VALUE: usize = 256;
const ROUNDS: usize = 4;
/// The anykv namespace; raw paths carry it too, so both sides touch the same znodes.
const NS: &str = "bench-zk";

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Get,
    Put,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// The store as applications get it: driver + layers.
    Anykv,
    /// The driver alone, without the layers (shows where overhead lies).
    Driver,
    /// zookeeper-client.
    Raw,
}

/// Ops per round: well under a second each on this machine.
fn ops_per_round(op: Op, conc: usize) -> usize {
    match (op, conc) {
        (Op::Put, 1) => 1_000,
        (Op::Get, 1) => 2_000,
        _ => 8_000,
    }
}

/// 8-byte key names: `k0000000` … `k0000999`.
fn name(i: usize) -> String {
    format!("k{:07}", i % NAMES)
}

#[derive(Default)]
struct Sample {
    ops: usize,
    elapsed: Duration,
    lat_us: Vec<u32>,
}

impl Sample {
    fn add(&mut self, ops: usize, (elapsed, mut lat): (Duration, Vec<u32>)) {
        self.ops += ops;
        self.elapsed += elapsed;
        self.lat_us.append(&mut lat);
    }

    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn pct(&mut self, p: f64) -> u32 {
        self.lat_us.sort_unstable();
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        self.lat_us.get(i).copied().unwrap_or(0)
    }
}

/// Everything the sides need, shared by the tasks of a round.
struct Clients {
    kv: Kv,
    driver: anykv_zookeeper::ZkStore,
    /// Keys with the namespace, as the driver takes them.
    full_keys: Vec<Key>,
    raw: zookeeper_client::Client,
    keys: Vec<Key>,
    paths: Vec<String>,
    value: Bytes,
}

/// One operation of one side.
async fn one(c: &Clients, side: Side, op: Op, i: usize) {
    match (side, op) {
        (Side::Anykv, Op::Get) => {
            c.kv.get(&c.keys[i]).await.unwrap().expect("bench key");
        }
        (Side::Anykv, Op::Put) => {
            c.kv.put(&c.keys[i], c.value.clone(), PutOptions::default())
                .await
                .unwrap();
        }
        (Side::Driver, Op::Get) => {
            c.driver
                .get(&c.full_keys[i])
                .await
                .unwrap()
                .expect("bench key");
        }
        (Side::Driver, Op::Put) => {
            c.driver
                .put(&c.full_keys[i], c.value.clone(), PutOptions::default())
                .await
                .unwrap();
        }
        (Side::Raw, Op::Get) => {
            let (data, _stat) = c.raw.get_data(&c.paths[i]).await.unwrap();
            assert_eq!(data.len(), VALUE, "bench key");
        }
        (Side::Raw, Op::Put) => {
            c.raw.set_data(&c.paths[i], &c.value, None).await.unwrap();
        }
    }
}

/// One round: `conc` tasks, each doing its share of the round's operations.
async fn round(c: &Arc<Clients>, side: Side, op: Op, conc: usize) -> (Duration, Vec<u32>) {
    let per = ops_per_round(op, conc) / conc;
    let started = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|w| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let t = Instant::now();
                    one(&c, side, op, (w * 7919 + i) % NAMES).await;
                    lat.push(t.elapsed().as_micros() as u32);
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (started.elapsed(), all)
}

fn main() {
    let Ok(url) = std::env::var("ANYKV_TEST_ZK") else {
        println!("ANYKV_TEST_ZK is not set: run `cargo xtask bench zookeeper`; nothing measured");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&url));
}

async fn run(url: &str) {
    let sep = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{sep}prefix={NS}");
    let kv = anykv_core::open(&scoped).await.unwrap();
    let (_, config, _) = anykv_core::registry::prepare(&scoped).unwrap();
    let driver = anykv_zookeeper::ZkStore::open(config).await.unwrap();
    let hosts = url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(url)
        .split(['/', '?'])
        .next()
        .unwrap_or("")
        .to_owned();
    let raw = zookeeper_client::Client::connect(&hosts).await.unwrap();
    let c = Arc::new(Clients {
        kv,
        driver,
        full_keys: (0..NAMES)
            .map(|i| Key::new(format!("{NS}/{}", name(i))).unwrap())
            .collect(),
        raw,
        keys: (0..NAMES).map(|i| Key::new(name(i)).unwrap()).collect(),
        paths: (0..NAMES).map(|i| format!("/{NS}/{}", name(i))).collect(),
        value: Bytes::from(vec![b'v'; VALUE]),
    });
    for k in &c.keys {
        c.kv.put(k, c.value.clone(), PutOptions::default())
            .await
            .unwrap();
    }

    println!(
        "\nanykv-zookeeper vs zookeeper-client 0.11, {}: {ROUNDS} interleaved rounds per side and cell,",
        anykv_core::config::redact(url)
    );
    println!("8-byte keys over {NAMES} names, {VALUE}-byte values\n");
    println!(
        "| op | conc | anykv ops/s | raw ops/s | anykv/raw | driver alone/raw | anykv p50/p99 µs | raw p50/p99 µs |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let sides = [Side::Anykv, Side::Driver, Side::Raw];
    for op in [Op::Get, Op::Put] {
        for conc in [1usize, 64] {
            // Warm every path (session, allocator) before measuring.
            for side in sides {
                round(&c, side, op, conc).await;
            }
            let mut samples: Vec<Sample> = sides.iter().map(|_| Sample::default()).collect();
            let n = ops_per_round(op, conc) / conc * conc;
            for r in 0..ROUNDS {
                for j in 0..sides.len() {
                    let s = (r + j) % sides.len(); // rotate who goes first
                    samples[s].add(n, round(&c, sides[s], op, conc).await);
                }
            }
            let [a, d, r] = &mut samples[..] else {
                unreachable!("three sides")
            };
            println!(
                "| {} | {conc} | {:.0} | {:.0} | {:.3} | {:.3} | {}/{} | {}/{} |",
                op.name(),
                a.ops_per_s(),
                r.ops_per_s(),
                a.ops_per_s() / r.ops_per_s(),
                d.ops_per_s() / r.ops_per_s(),
                a.pct(0.5),
                a.pct(0.99),
                r.pct(0.5),
                r.pct(0.99),
            );
        }
    }
    let _ = c.kv.delete_prefix(&Prefix::root()).await;
}
