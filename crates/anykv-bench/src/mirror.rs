//! `cargo xtask bench mirror`: what a [`Mirror`](anykv::Mirror) of a large
//! prefix costs, on every backend (issue 10).
//!
//! For each backend one child process (so its memory is the case's alone)
//! writes `--keys` keys (100,000 by default) of 64-byte values under a fresh
//! namespace, then measures:
//! - **list**: the wall time of a plain `list` of the prefix (best of 3);
//! - **first sync**: the wall time of `mirror()` until it returns (snapshot
//!   applied, watch running), and its ratio to **list** (target ≤ 1.5×);
//! - **bytes per key**: the live heap bytes the mirror adds, per key (a
//!   counting global allocator: allocations minus frees, which machine noise
//!   does not move), against the target 2 × (key + value) + 100 B; and the
//!   RSS growth per key, which also counts memory freed while loading but
//!   kept by the allocator;
//! - **get**: `Mirror::get` calls per second on one thread for one second,
//!   cycling over every key (target ≥ 5 million/s);
//! - **delay**: for 300 paced puts into the prefix on another handle, the
//!   time from the put's acknowledgement to the mirror's change event for
//!   it, p50 / p99 (0 when the event came first).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use anykv::{Bytes, Event, Key, Kv, Op, Prefix, PutOptions, Store, StoreExt};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::measure::rss_bytes;

/// Marks the child's result line on stdout.
const RESULT: &str = "MIRROR-RESULT ";
/// Puts whose delay is measured.
const DELAY_PUTS: usize = 300;
const VALUE_LEN: usize = 64;

/// One backend's figures.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct MirrorResult {
    backend: String,
    keys: usize,
    key_len: usize,
    list_ms: f64,
    sync_ms: f64,
    heap_bytes_per_key: f64,
    rss_bytes_per_key: f64,
    gets_per_sec: f64,
    delay_p50_ms: f64,
    delay_p99_ms: f64,
    error: Option<String>,
}

fn key_name(i: usize) -> String {
    format!("m/k{i:06}")
}

/// The child: one backend, printed as one result line.
pub fn case(backend: &str, url: &str, keys: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut result = rt
        .block_on(measure(url, keys))
        .unwrap_or_else(|e| MirrorResult {
            error: Some(format!("{e:#}")),
            ..MirrorResult::default()
        });
    result.backend = backend.to_owned();
    result.keys = keys;
    println!("{RESULT}{}", serde_json::to_string(&result)?);
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

async fn fill(kv: &Kv, keys: usize) -> Result<()> {
    let batch = kv.capabilities().max_atomic_ops.unwrap_or(256).min(256);
    let value = Bytes::from(vec![b'v'; VALUE_LEN]);
    let chunks: Vec<Vec<usize>> = (0..keys)
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(<[usize]>::to_vec)
        .collect();
    futures::stream::iter(chunks)
        .map(|chunk| {
            let (kv, value) = (kv.clone(), value.clone());
            async move {
                let ops = chunk
                    .iter()
                    .map(|i| Ok(Op::Put(Key::new(key_name(*i))?, value.clone())))
                    .collect::<anykv::Result<Vec<_>>>()?;
                kv.atomic(Vec::new(), ops).await.map(drop)
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anykv::Result<Vec<()>>>()
        .context("writing the keys")?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn measure(url: &str, keys: usize) -> Result<MirrorResult> {
    let ns = format!("anykv-bench-mirror-{:08x}", rand_suffix());
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}prefix={ns}&timeout=60s");
    let kv = anykv::open(&url).await.context("open")?;
    let writer = anykv::open(&url).await.context("open the writer")?;
    let prefix = Prefix::new("m")?;
    fill(&writer, keys).await?;

    let mut list = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let n = kv.list(&prefix).await?.len();
        list = list.min(t.elapsed());
        if n != keys {
            bail!("list returned {n} of {keys} keys");
        }
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before, heap_before) = (rss_bytes(), crate::heap_bytes());
    let t = Instant::now();
    let mirror = kv.mirror(&prefix).await.context("mirror")?;
    let sync = t.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (after, heap_after) = (rss_bytes(), crate::heap_bytes());
    if mirror.len() != keys {
        bail!("the mirror holds {} of {keys} keys", mirror.len());
    }

    // Gets on one thread, cycling over every key.
    let names: Vec<Key> = (0..keys)
        .map(|i| Key::new(key_name(i)))
        .collect::<anykv::Result<_>>()?;
    let mirror = Arc::new(mirror);
    let gets = {
        let (mirror, names) = (mirror.clone(), names.clone());
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < Duration::from_secs(1) {
                for k in names.iter().take(10_000) {
                    std::hint::black_box(mirror.get(k));
                }
                n += 10_000.min(names.len() as u64);
            }
            n as f64 / t.elapsed().as_secs_f64()
        })
        .await?
    };

    // Put → mirror delay.
    let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut changes = mirror.changes();
    let recorder = {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            while let Some(item) = changes.next().await {
                if let Ok(Event::Put { kv, .. }) = item {
                    arrived
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(kv.key.to_string())
                        .or_insert_with(Instant::now);
                }
            }
        })
    };
    let mut acks = Vec::with_capacity(DELAY_PUTS);
    for i in 0..DELAY_PUTS {
        let k = Key::new(format!("m/delay{i:04}"))?;
        writer
            .put(&k, Bytes::from_static(b"d"), PutOptions::default())
            .await?;
        acks.push((k.to_string(), Instant::now()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrived.lock().unwrap_or_else(|p| p.into_inner()).len() < DELAY_PUTS {
        if Instant::now() > deadline {
            bail!("the mirror missed puts");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    recorder.abort();
    let arrived = arrived.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut delays: Vec<f64> = acks
        .iter()
        .map(|(k, ack)| {
            arrived
                .get(k)
                .map_or(0.0, |at| ms(at.saturating_duration_since(*ack)))
        })
        .collect();
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| delays[((delays.len() as f64 - 1.0) * p).round() as usize];

    let _ = writer.delete_prefix(&Prefix::root()).await;
    Ok(MirrorResult {
        key_len: key_name(0).len(),
        list_ms: ms(list),
        sync_ms: ms(sync),
        heap_bytes_per_key: heap_after.saturating_sub(heap_before) as f64 / keys as f64,
        rss_bytes_per_key: after.saturating_sub(before) as f64 / keys as f64,
        gets_per_sec: gets,
        delay_p50_ms: pct(0.5),
        delay_p99_ms: pct(0.99),
        ..MirrorResult::default()
    })
}

fn rand_suffix() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    t ^ std::process::id()
}

/// The parent: one child per backend, then one markdown table.
pub fn run(backends: &[String], keys: usize, urls: impl Fn(&str) -> Option<String>) -> Result<()> {
    let exe = std::env::current_exe()?;
    println!("# anykv mirror bench\n");
    println!(
        "{keys} keys of {VALUE_LEN}-byte values per backend, one child process each; release build. \
         Target bytes per key: 2 × (key + value) + 100 B.\n"
    );
    println!(
        "| backend | list ms | first sync ms | sync / list (≤ 1.5) | heap bytes per key (target) | RSS bytes per key | Mirror::get per s (≥ 5 M) | put → mirror p50 / p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for backend in backends {
        let Some(url) = urls(backend) else {
            println!("| {backend} | no server | | | | | | |");
            continue;
        };
        let out = std::process::Command::new(&exe)
            .args(["mirror-case", backend, &url, &keys.to_string()])
            .output()
            .context("running a mirror case")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(r) = text
            .lines()
            .find_map(|l| l.strip_prefix(RESULT))
            .and_then(|j| serde_json::from_str::<MirrorResult>(j).ok())
        else {
            println!(
                "| {backend} | failed: {} | | | | | | |",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("no output")
            );
            continue;
        };
        if let Some(e) = &r.error {
            println!("| {backend} | failed: {e} | | | | | | |");
            continue;
        }
        let target = 2.0 * (r.key_len + VALUE_LEN) as f64 + 100.0;
        println!(
            "| {backend} | {:.0} | {:.0} | {:.2} | {:.0} ({target:.0}) | {:.0} | {:.1} M | {:.2} / {:.2} |",
            r.list_ms,
            r.sync_ms,
            r.sync_ms / r.list_ms.max(0.001),
            r.heap_bytes_per_key,
            r.rss_bytes_per_key,
            r.gets_per_sec / 1e6,
            r.delay_p50_ms,
            r.delay_p99_ms
        );
    }
    Ok(())
}
