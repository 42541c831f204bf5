//! anykv-etcd against raw etcd-client, same server, one process.
//!
//! Run with `cargo xtask bench etcd` (starts etcd and sets ANYKV_TEST_ETCD).
//! Three sides take turns on the same keys (the harness is
//! `anykv_testkit::bench`: rotating interleaved rounds, get / put ×
//! concurrency 1 / 64, 8-byte keys over 1,000 names, 256-byte values):
//!
//! - `anykv`: `anykv_core::open(url)`, the driver inside the standard layers,
//!   as applications use it;
//! - `driver`: the bare `EtcdStore` (no layers), to tell the driver's cost
//!   from the layers';
//! - `raw`: etcd-client's `KvClient`, cloned per operation as the driver
//!   does (its calls take `&mut self`).
//!
//! Prints a markdown table of ops/s, p50/p99 latency and the ratios to raw.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark binary: fail loudly

use std::sync::Arc;

use anykv_core::{Bytes, Key, Prefix, Store};
use anykv_etcd::{EtcdOptions, EtcdStore};
use anykv_testkit::{
    bench::{self, BoxFuture, Op, Side, StoreSide},
    server,
};
use etcd_client::KvClient;

/// The anykv namespace; the driver's and raw keys carry it too, so every
/// side sends the same bytes.
const NS: &str = "bench";

/// etcd-client, on the keys anykv writes.
struct Raw {
    client: KvClient,
    keys: Vec<Key>,
    value: Bytes,
}

impl Side for Raw {
    fn run(&self, op: Op, i: usize) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (mut client, key) = (self.client.clone(), self.keys[i].as_str());
            if op == Op::Get {
                let r = client.get(key, None).await.unwrap();
                assert!(!r.kvs().is_empty(), "bench key");
            } else {
                client.put(key, self.value.to_vec(), None).await.unwrap();
            }
        })
    }
}

fn main() {
    bench::main("ANYKV_TEST_ETCD", run);
}

async fn run(url: String) {
    let kv = bench::open(&url, NS).await;
    // The bare driver and the raw client see keys with the namespace.
    let ns_slash = format!("{NS}/");
    let endpoints = server::endpoints(&url);
    let driver = EtcdStore::connect(EtcdOptions::new(endpoints.clone())).await;
    let driver = StoreSide::new(driver.unwrap(), &ns_slash);
    let client = etcd_client::Client::connect(&endpoints, None).await;
    let raw = Raw {
        client: client.unwrap().kv_client(),
        keys: bench::keys(&ns_slash),
        value: bench::value(),
    };
    let sides: [(&str, Arc<dyn Side>); 3] = [
        ("anykv", Arc::new(StoreSide::new(kv.clone(), ""))),
        ("driver", Arc::new(driver)),
        ("raw", Arc::new(raw)),
    ];
    let title = format!("anykv-etcd vs etcd-client 0.21, {url}");
    let cells = bench::get_put([1_200, 6_400], [600, 6_400]); // ops per round: under a second
    bench::compare(&title, &sides, &[(0, 2), (1, 2)], &cells, 4).await;
    let _ = kv.delete_prefix(&Prefix::root()).await;
}
