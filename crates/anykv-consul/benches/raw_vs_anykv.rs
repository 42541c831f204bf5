//! anykv-consul against raw clients, same agent, one process.
//!
//! Run with `cargo xtask bench consul` (starts Consul and sets ANYKV_TEST_CONSUL).
//!
//! Raw sides:
//! - **consulrs**: consulrs 0.1.0's own `kv::read` (`GET /v1/kv/k`) and
//!   `kv::set` (`PUT /v1/kv/k`, which answers only `true`);
//! - **txn** (puts only): plain reqwest sending the `/v1/txn` `set` that
//!   anykv sends, because `put` must return the new version (`ModifyIndex`)
//!   and Consul's plain `PUT` does not say it. anykv/consulrs shows what that
//!   costs on the server; anykv/txn shows anykv's own overhead.
//!
//! For each cell (get / put × concurrency 1 / 64) the clients take turns,
//! round after round (the order rotating), each round a fixed number of
//! operations on 8-byte keys over 1,000 names with 256-byte values, so noise
//! on a shared machine hits every side alike. Prints a markdown table of
//! ops/s, p50/p99 latency and the anykv/raw throughput ratio.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark binary: fail loudly

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anykv_consul as _;
use anykv_core::{Bytes, Key, Kv, PutOptions, Store};
use consulrs::client::{ConsulClient, ConsulClientSettingsBuilder};

const NAMES: usize = 1000;
const VALUE: usize = 256;
/// Many short rounds: on a shared machine, load comes and goes; fine
/// interleaving spreads it evenly over the sides.
const ROUNDS: usize = 10;
/// The anykv namespace; raw keys carry it too, so every side sends the same keys.
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

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Anykv,
    Consulrs,
    Txn,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Anykv => "anykv",
            Side::Consulrs => "consulrs",
            Side::Txn => "reqwest /v1/txn",
        }
    }
}

/// Ops per round: a fraction of a second to a second each on this machine.
fn ops_per_round(op: Op, conc: usize) -> usize {
    match (op, conc) {
        (Op::Put, 1) => 600,
        (Op::Get, 1) => 1_200,
        _ => 4_096,
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
    consulrs: ConsulClient,
    reqwest: reqwest::Client,
    txn_url: String,
    keys: Vec<Key>,
    raw_keys: Vec<String>,
    value: Bytes,
    /// consulrs' `kv::set` takes only `&'static [u8]`.
    static_value: &'static [u8],
    b64_value: String,
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
        (Side::Consulrs, Op::Get) => {
            let r = consulrs::kv::read(&c.consulrs, &c.raw_keys[i], None)
                .await
                .unwrap();
            assert!(!r.response.is_empty(), "bench key");
        }
        (Side::Consulrs, Op::Put) => {
            let r = consulrs::kv::set(&c.consulrs, &c.raw_keys[i], c.static_value, None)
                .await
                .unwrap();
            assert!(r.response);
        }
        (Side::Txn, _) => {
            let body = format!(
                r#"[{{"KV":{{"Verb":"set","Key":"{}","Value":"{}","Flags":{}}}}}]"#,
                c.raw_keys[i],
                c.b64_value,
                rand::random::<u64>()
            );
            let r = c.reqwest.put(&c.txn_url).body(body).send().await.unwrap();
            assert!(r.status().is_success());
            let body = r.bytes().await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v["Results"][0]["KV"]["ModifyIndex"].as_u64().is_some());
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
    let Ok(url) = std::env::var("ANYKV_TEST_CONSUL") else {
        println!("ANYKV_TEST_CONSUL is not set: run `cargo xtask bench consul`; nothing measured");
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
    use base64::Engine;
    let sep = if url.contains('?') { '&' } else { '?' };
    let kv = anykv_core::open(&format!("{url}{sep}prefix={NS}"))
        .await
        .unwrap();
    let addr = url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(url)
        .split(['/', '?'])
        .next()
        .unwrap_or("")
        .to_owned();
    let settings = ConsulClientSettingsBuilder::default()
        .address(format!("http://{addr}"))
        .build()
        .unwrap();
    let value = Bytes::from(vec![b'v'; VALUE]);
    let c = Arc::new(Clients {
        kv,
        consulrs: ConsulClient::new(settings).unwrap(),
        reqwest: reqwest::Client::new(),
        txn_url: format!("http://{addr}/v1/txn"),
        keys: (0..NAMES).map(|i| Key::new(name(i)).unwrap()).collect(),
        raw_keys: (0..NAMES).map(|i| format!("{NS}/{}", name(i))).collect(),
        static_value: Box::leak(value.to_vec().into_boxed_slice()),
        b64_value: base64::engine::general_purpose::STANDARD.encode(&value),
        value,
    });
    for k in &c.keys {
        c.kv.put(k, c.value.clone(), PutOptions::default())
            .await
            .unwrap();
    }

    println!(
        "\nanykv-consul vs raw clients, {url}: {ROUNDS} interleaved rounds per side and cell,"
    );
    println!("8-byte keys over {NAMES} names, {VALUE}-byte values\n");
    println!(
        "| op | conc | raw client | anykv ops/s | raw ops/s | anykv/raw | anykv p50/p99 µs | raw p50/p99 µs |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for op in [Op::Get, Op::Put] {
        let sides: &[Side] = match op {
            Op::Get => &[Side::Anykv, Side::Consulrs],
            Op::Put => &[Side::Anykv, Side::Consulrs, Side::Txn],
        };
        for conc in [1usize, 64] {
            // Warm every path (connections, allocator) before measuring.
            for &s in sides {
                round(&c, s, op, conc).await;
            }
            let mut samples: Vec<Sample> = sides.iter().map(|_| Sample::default()).collect();
            let n = ops_per_round(op, conc) / conc * conc;
            for r in 0..ROUNDS {
                for j in 0..sides.len() {
                    let s = (r + j) % sides.len(); // rotate who goes first
                    samples[s].add(n, round(&c, sides[s], op, conc).await);
                }
            }
            let (anykv, raws) = samples.split_at_mut(1);
            let a = &mut anykv[0];
            for (raw, side) in raws.iter_mut().zip(&sides[1..]) {
                println!(
                    "| {} | {conc} | {} | {:.0} | {:.0} | {:.3} | {}/{} | {}/{} |",
                    op.name(),
                    side.name(),
                    a.ops_per_s(),
                    raw.ops_per_s(),
                    a.ops_per_s() / raw.ops_per_s(),
                    a.pct(0.5),
                    a.pct(0.99),
                    raw.pct(0.5),
                    raw.pct(0.99),
                );
            }
        }
    }
    let _ = c.kv.delete_prefix(&anykv_core::Prefix::root()).await;
}
