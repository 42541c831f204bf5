//! The watch-scale measurement of issue 13, shared by the memory and redb
//! tests (anykv-redb includes this file with `#[path]`): N watches (half on
//! keys, half on prefixes) on one store, puts at a fixed rate, each put
//! matching one watch. Prints setup time, RSS per watch, CPU use during the
//! puts and the delay from put issue to event receipt (p50/p99/max).
//! RSS per watch is meaningful only for the first run in a process (later
//! runs reuse freed memory): run each case as its own test invocation.

#![allow(dead_code, clippy::unwrap_used)] // tests may unwrap

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anykv_core::{Key, Prefix, PutOptions, Start, Store, Target};
use futures::StreamExt;

/// What one run measured.
#[derive(Debug)]
pub struct Figures {
    pub setup: Duration,
    pub rss_per_watch: f64,
    pub cpu_cores: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub events: usize,
    /// p99 of the puts' own latency (issue to acknowledgement): the floor
    /// under the event delay, since an event is sent once its put commits.
    pub put_p99: Duration,
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// User + system CPU time of the process.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces) start at 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

fn target(i: usize) -> (Target, Key) {
    if i.is_multiple_of(2) {
        let k = Key::new(format!("ws/k{i}")).unwrap();
        (Target::Key(k.clone()), k)
    } else {
        (
            Target::Prefix(Prefix::new(format!("ws/p{i}")).unwrap()),
            Key::new(format!("ws/p{i}/x")).unwrap(),
        )
    }
}

/// `watches` watches, `rate` puts per second for `run`.
pub async fn measure(store: Arc<dyn Store>, watches: usize, rate: u32, run: Duration) -> Figures {
    let puts = (rate as f64 * run.as_secs_f64()) as usize;
    // Each put matches one watch, round robin: how many each one gets.
    let per_watch = |i: usize| puts / watches + usize::from(i < puts % watches);
    let rss0 = rss_bytes();
    let started = Instant::now();
    let mut streams = Vec::with_capacity(watches);
    for i in 0..watches {
        streams.push(store.watch(target(i).0, Start::Now).await.unwrap());
    }
    let setup = started.elapsed();
    let rss_per_watch = rss_bytes().saturating_sub(rss0) as f64 / watches as f64;

    let t0 = Instant::now();
    let mut readers = Vec::with_capacity(watches);
    for (i, mut w) in streams.into_iter().enumerate() {
        let n = per_watch(i);
        readers.push(tokio::spawn(async move {
            let mut delays = Vec::with_capacity(n);
            for _ in 0..n {
                let ev = tokio::time::timeout(Duration::from_secs(30), w.next())
                    .await
                    .expect("event in time")
                    .expect("open")
                    .expect("no error");
                let anykv_core::Event::Put { kv, .. } = ev else {
                    panic!("put expected")
                };
                let sent: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                delays.push(t0.elapsed().saturating_sub(Duration::from_micros(sent)));
            }
            (delays, w)
        }));
    }
    // Every reader polled once (waiting on its watch) before the clock runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu0 = cpu_time();
    let wall0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut writes = Vec::with_capacity(puts);
    for j in 0..puts {
        tick.tick().await;
        let s = store.clone();
        let key = target(j % watches).1;
        let sent = t0.elapsed().as_micros().to_string();
        // Issued at the rate, whatever each put's latency.
        writes.push(tokio::spawn(async move {
            let began = Instant::now();
            s.put(&key, sent.into(), PutOptions::default())
                .await
                .unwrap();
            began.elapsed()
        }));
    }
    let mut put_latency = Vec::with_capacity(puts);
    for w in writes {
        put_latency.push(w.await.unwrap());
    }
    put_latency.sort_unstable();
    let mut delays = Vec::with_capacity(puts);
    let mut kept = Vec::with_capacity(watches);
    for r in readers {
        let (d, w) = r.await.unwrap();
        delays.extend(d);
        kept.push(w);
    }
    let cpu = cpu_time().saturating_sub(cpu0);
    let wall = wall0.elapsed();
    delays.sort_unstable();
    let at = |q: f64| delays[((delays.len() as f64 * q) as usize).min(delays.len() - 1)];
    let figures = Figures {
        setup,
        rss_per_watch,
        cpu_cores: cpu.as_secs_f64() / wall.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        max: *delays.last().unwrap(),
        events: delays.len(),
        put_p99: put_latency[(put_latency.len() * 99 / 100).min(put_latency.len() - 1)],
    };
    drop(kept);
    figures
}
