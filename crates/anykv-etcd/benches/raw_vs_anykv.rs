//! anykv-etcd against raw etcd-client, same server, one process.
//!
//! Run with `cargo xtask bench etcd` (starts etcd and sets ANYKV_TEST_ETCD).
//! For each cell (get / put × concurrency 1 / 64) three clients take turns,
//! round after round (the order rotating), each round a fixed number of
//! operations on 8-byte keys over 1,000 names with 256-byte values, so noise
//! on a shared machine hits every side alike:
//!
//! - `anykv`: `anykv_core::open(url)`, the driver inside the standard layers,
//!   as applications use it;
//! - `driver`: the bare `EtcdStore` (no layers), to tell the driver's cost
//!   from the layers';
//! - `raw`: etcd-client's `KvClient`.
//!
//! Prints a markdown table of ops/s, p50/p99 latency and the ratios to raw.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark binary: fail loudly

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anykv_core::{Bytes, Key, PutOptions, Store};
use anykv_etcd as _;
use etcd_client::KvClient;

const NAMES: usize = 1000;
const VALUE: usize = 256;
const ROUNDS: usize = 4;
/// What one round runs against.
type Handle = Arc<dyn Store>;
/// The anykv namespace; raw keys carry it too, so both send the same bytes.
const NS: &str = "bench";

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

/// Ops per round: a fraction of a second to a second each on this machine.
fn ops_per_round(op: Op, conc: usize) -> usize {
    match (op, conc) {
        (Op::Put, 1) => 600,
        (Op::Get, 1) => 1_200,
        _ => 6_400,
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
    fn add(&mut self, ops: usize, elapsed: Duration, mut lat: Vec<u32>) {
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

/// Waits for the tasks of a round; returns wall time and every latency.
async fn finish(
    started: Instant,
    tasks: Vec<tokio::task::JoinHandle<Vec<u32>>>,
) -> (Duration, Vec<u32>) {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (started.elapsed(), all)
}

/// One round through a `Store` (anykv, or the bare driver with full keys):
/// `conc` tasks, each with its own handle clone.
async fn store_round(
    kv: &Handle,
    keys: &Arc<Vec<Key>>,
    op: Op,
    conc: usize,
    value: &Bytes,
) -> (Duration, Vec<u32>) {
    let per = ops_per_round(op, conc) / conc;
    let started = Instant::now();
    let tasks = (0..conc)
        .map(|w| {
            let (kv, value, keys) = (kv.clone(), value.clone(), keys.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let k = &keys[(w * 7919 + i) % NAMES];
                    let t = Instant::now();
                    match op {
                        Op::Get => {
                            kv.get(k).await.unwrap().expect("bench key");
                        }
                        Op::Put => {
                            kv.put(k, value.clone(), PutOptions::default())
                                .await
                                .unwrap();
                        }
                    }
                    lat.push(t.elapsed().as_micros() as u32);
                }
                lat
            })
        })
        .collect();
    finish(started, tasks).await
}

/// The same round through the raw client, each task with its own client clone.
async fn raw_round(client: &KvClient, op: Op, conc: usize, value: &Bytes) -> (Duration, Vec<u32>) {
    let keys: Arc<Vec<String>> =
        Arc::new((0..NAMES).map(|i| format!("{NS}/{}", name(i))).collect());
    let per = ops_per_round(op, conc) / conc;
    let started = Instant::now();
    let tasks = (0..conc)
        .map(|w| {
            let (mut client, value, keys) = (client.clone(), value.clone(), keys.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let k = keys[(w * 7919 + i) % NAMES].as_str();
                    let t = Instant::now();
                    match op {
                        Op::Get => {
                            let r = client.get(k, None).await.unwrap();
                            assert!(!r.kvs().is_empty(), "bench key");
                        }
                        Op::Put => {
                            client.put(k, value.to_vec(), None).await.unwrap();
                        }
                    }
                    lat.push(t.elapsed().as_micros() as u32);
                }
                lat
            })
        })
        .collect();
    finish(started, tasks).await
}

fn main() {
    let Ok(url) = std::env::var("ANYKV_TEST_ETCD") else {
        println!("ANYKV_TEST_ETCD is not set: run `cargo xtask bench etcd`; nothing measured");
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
    let kv = anykv_core::open(&format!("{url}{sep}prefix={NS}"))
        .await
        .unwrap();
    let endpoints: Vec<String> = url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(url)
        .split(['/', '?'])
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::to_owned)
        .collect();
    let driver = anykv_etcd::EtcdStore::connect(anykv_etcd::EtcdOptions::new(endpoints.clone()))
        .await
        .unwrap();
    let raw = etcd_client::Client::connect(&endpoints, None)
        .await
        .unwrap()
        .kv_client();
    let value = Bytes::from(vec![b'v'; VALUE]);
    for i in 0..NAMES {
        kv.put(
            &Key::new(name(i)).unwrap(),
            value.clone(),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    // The layers add the namespace; the bare driver gets the full keys.
    let short: Arc<Vec<Key>> = Arc::new((0..NAMES).map(|i| Key::new(name(i)).unwrap()).collect());
    let full: Arc<Vec<Key>> = Arc::new(
        (0..NAMES)
            .map(|i| Key::new(format!("{NS}/{}", name(i))).unwrap())
            .collect(),
    );
    let kv: Handle = Arc::new(kv);
    let driver: Handle = Arc::new(driver);

    println!(
        "\nanykv-etcd vs etcd-client 0.21, {url}: {ROUNDS} interleaved rounds per side and cell,"
    );
    println!("8-byte keys over {NAMES} names, {VALUE}-byte values\n");
    println!(
        "| op | conc | anykv ops/s | driver ops/s | raw ops/s | anykv/raw | driver/raw | anykv p50/p99 µs | raw p50/p99 µs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for op in [Op::Get, Op::Put] {
        for conc in [1usize, 64] {
            let n = ops_per_round(op, conc) / conc * conc;
            // Warm every path (connections, allocator) before measuring.
            store_round(&kv, &short, op, conc, &value).await;
            store_round(&driver, &full, op, conc, &value).await;
            raw_round(&raw, op, conc, &value).await;
            let mut s = [Sample::default(), Sample::default(), Sample::default()];
            for round in 0..ROUNDS {
                // Rotate who goes first.
                for side in (0..3).map(|j| (j + round) % 3) {
                    let (t, l) = match side {
                        0 => store_round(&kv, &short, op, conc, &value).await,
                        1 => store_round(&driver, &full, op, conc, &value).await,
                        _ => raw_round(&raw, op, conc, &value).await,
                    };
                    s[side].add(n, t, l);
                }
            }
            let [a, d, r] = &mut s;
            println!(
                "| {} | {conc} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} | {}/{} | {}/{} |",
                op.name(),
                a.ops_per_s(),
                d.ops_per_s(),
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
    let _ = kv.delete_prefix(&anykv_core::Prefix::root()).await;
}
