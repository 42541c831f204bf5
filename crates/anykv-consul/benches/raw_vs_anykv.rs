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
//! The harness is `anykv_testkit::bench`: for each cell (get / put ×
//! concurrency 1 / 64) the clients take turns, round after round (the order
//! rotating), each round a fixed number of operations on 8-byte keys over
//! 1,000 names with 256-byte values, so noise on a shared machine hits every
//! side alike. Prints a markdown table of ops/s, p50/p99 latency and the
//! anykv/raw throughput ratios.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark binary: fail loudly

use std::sync::Arc;

use anykv_consul as _;
use anykv_core::{Prefix, Store};
use anykv_testkit::{
    bench::{self, BoxFuture, Op, Side, StoreSide},
    server,
};
use base64::Engine;
use consulrs::client::{ConsulClient, ConsulClientSettingsBuilder};

/// The anykv namespace; raw keys carry it too, so every side sends the same keys.
const NS: &str = "bench";

/// The keys anykv writes, as the raw clients name them.
fn raw_keys() -> Vec<String> {
    let keys = bench::keys(&format!("{NS}/"));
    keys.iter().map(|k| k.as_str().to_owned()).collect()
}

/// consulrs' own KV calls.
struct Consulrs {
    client: ConsulClient,
    keys: Vec<String>,
    /// `kv::set` takes only `&'static [u8]`.
    value: &'static [u8],
}

impl Side for Consulrs {
    fn run(&self, op: Op, i: usize) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let key = &self.keys[i];
            if op == Op::Get {
                let r = consulrs::kv::read(&self.client, key, None).await.unwrap();
                assert!(!r.response.is_empty(), "bench key");
            } else {
                let r = consulrs::kv::set(&self.client, key, self.value, None).await;
                assert!(r.unwrap().response);
            }
        })
    }
}

/// What anykv sends for a put: a one-op `/v1/txn` `set`, through reqwest.
struct Txn {
    client: reqwest::Client,
    url: String,
    keys: Vec<String>,
    b64_value: String,
}

impl Side for Txn {
    fn run(&self, _op: Op, i: usize) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Random flags, so every put changes the key.
            let body = format!(
                r#"[{{"KV":{{"Verb":"set","Key":"{}","Value":"{}","Flags":{}}}}}]"#,
                self.keys[i],
                self.b64_value,
                rand::random::<u64>()
            );
            let r = self.client.put(&self.url).body(body).send().await.unwrap();
            assert!(r.status().is_success());
            let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            assert!(v["Results"][0]["KV"]["ModifyIndex"].as_u64().is_some());
        })
    }

    fn takes_part(&self, op: Op) -> bool {
        op == Op::Put
    }
}

fn main() {
    bench::main("ANYKV_TEST_CONSUL", run);
}

async fn run(url: String) {
    let kv = bench::open(&url, NS).await;
    let addr = server::endpoints(&url).swap_remove(0);
    let settings = ConsulClientSettingsBuilder::default()
        .address(format!("http://{addr}"))
        .build()
        .unwrap();
    let value = bench::value();
    let consulrs = Consulrs {
        client: ConsulClient::new(settings).unwrap(),
        keys: raw_keys(),
        value: Box::leak(value.to_vec().into_boxed_slice()),
    };
    let txn = Txn {
        client: reqwest::Client::new(),
        url: format!("http://{addr}/v1/txn"),
        keys: raw_keys(),
        b64_value: base64::engine::general_purpose::STANDARD.encode(&value),
    };
    let sides: [(&str, Arc<dyn Side>); 3] = [
        ("anykv", Arc::new(StoreSide::new(kv.clone(), ""))),
        ("consulrs", Arc::new(consulrs)),
        ("txn", Arc::new(txn)),
    ];
    let title = format!("anykv-consul vs raw clients, {url}");
    let cells = bench::get_put([1_200, 4_096], [600, 4_096]); // ops per round: under a second
    // Many short rounds: on a shared machine, load comes and goes; fine
    // interleaving spreads it evenly over the sides.
    bench::compare(&title, &sides, &[(0, 1), (0, 2)], &cells, 10).await;
    let _ = kv.delete_prefix(&Prefix::root()).await;
}
