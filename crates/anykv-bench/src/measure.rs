//! What the bench reads from the machine and how it paces and times work:
//! `/proc` readings (resident memory, sockets, CPU time), a clock shared by
//! the writer and the watch consumers, percentiles, and the paced writer.

use std::{
    fs,
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;

/// Bytes per page in `/proc/*/statm` (4 KiB on x86-64 Linux).
const PAGE: u64 = 4096;

/// Milliseconds per clock tick of `/proc/*/stat` (`CLK_TCK` is 100 on Linux).
const MS_PER_TICK: f64 = 10.0;

/// Puts the paced writer keeps in flight at most (it issues on schedule,
/// without waiting for earlier acknowledgements, up to this bound).
const MAX_IN_FLIGHT: usize = 64;

/// Resident memory of this process, in bytes (`/proc/self/statm`, field 2).
pub fn rss_bytes() -> u64 {
    fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * PAGE)
}

/// Open sockets of this process: entries of `/proc/self/fd` linking to `socket:[…]`.
pub fn sockets() -> u64 {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count() as u64
}

/// CPU time (user + system) of a process so far, in milliseconds
/// (`/proc/<pid>/stat` fields 14 and 15); `None` if it cannot be read.
pub fn cpu_ms(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = fs::read_to_string(path).ok()?;
    // The command name may hold spaces: fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 * MS_PER_TICK)
}

/// Wall and CPU time of a stretch of work, started by [`Span::start`].
pub struct Span {
    wall: Instant,
    cpu: Option<f64>,
}

impl Span {
    /// Starts measuring (this process's CPU).
    pub fn start() -> Span {
        Span {
            wall: Instant::now(),
            cpu: cpu_ms(None),
        }
    }

    /// (wall ms, CPU ms of this process) since the start.
    pub fn stop(&self) -> (f64, Option<f64>) {
        let wall = self.wall.elapsed().as_secs_f64() * 1e3;
        let cpu = match (self.cpu, cpu_ms(None)) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        (wall, cpu)
    }
}

/// Nanoseconds since the process's first call, never 0 (0 means "not yet"
/// in the per-key time slots).
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// One time slot per key, filled once (the first event, or the ack).
pub struct Slots(Vec<AtomicU64>);

impl Slots {
    /// `n` empty slots.
    pub fn new(n: usize) -> Arc<Slots> {
        Arc::new(Slots((0..n).map(|_| AtomicU64::new(0)).collect()))
    }

    /// Records `now_ns()` in slot `i` unless it is already set; true if it was empty.
    pub fn mark(&self, i: usize) -> bool {
        self.0.get(i).is_some_and(|s| {
            s.compare_exchange(0, now_ns(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// The time in slot `i` (0: empty).
    pub fn get(&self, i: usize) -> u64 {
        self.0.get(i).map_or(0, |s| s.load(Ordering::Acquire))
    }

    /// Number of filled slots among the first `n`.
    pub fn filled(&self, n: usize) -> u64 {
        self.0
            .iter()
            .take(n)
            .filter(|s| s.load(Ordering::Acquire) != 0)
            .count() as u64
    }
}

/// p50, p99 and max of durations in milliseconds (`None` when empty).
pub fn percentiles(mut ms: Vec<f64>) -> Option<(f64, f64, f64)> {
    if ms.is_empty() {
        return None;
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    Some((at(0.50), at(0.99), ms[ms.len() - 1]))
}

/// What the paced writer saw.
pub struct PutRun {
    /// Acknowledgement time of put `i` (see [`now_ns`]; 0: failed or unanswered).
    pub acks: Arc<Slots>,
    /// Latency of each acknowledged put, in ms.
    pub latencies_ms: Vec<f64>,
    /// Failed puts, with the first error.
    pub failed: u64,
    /// The first error message.
    pub first_error: Option<String>,
    /// Wall time from the first put to the last acknowledgement, in s.
    pub secs: f64,
}

/// Issues puts `0..count` at `rate` per second, each at its scheduled time
/// (up to [`MAX_IN_FLIGHT`] outstanding: a slow server delays the schedule
/// rather than piling up requests), and records send → ack latencies and
/// ack times. Every put is bounded by `timeout`.
pub async fn paced_puts<F, Fut>(count: usize, rate: f64, timeout: Duration, put: F) -> PutRun
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let acks = Slots::new(count);
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let start = tokio::time::Instant::now();
    let wall = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let fut = put(i);
        let acks = acks.clone();
        tasks.push(tokio::spawn(async move {
            let sent = now_ns();
            let out = match tokio::time::timeout(timeout, fut).await {
                Ok(Ok(())) => {
                    acks.mark(i);
                    Ok((acks.get(i) - sent) as f64 / 1e6)
                }
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(_) => Err(format!("put timed out after {timeout:?}")),
            };
            drop(permit);
            out
        }));
    }
    let mut run = PutRun {
        acks,
        latencies_ms: Vec::with_capacity(count),
        failed: 0,
        first_error: None,
        secs: 0.0,
    };
    for t in tasks {
        match t.await {
            Ok(Ok(ms)) => run.latencies_ms.push(ms),
            Ok(Err(e)) => {
                run.failed += 1;
                run.first_error.get_or_insert(e);
            }
            Err(e) => {
                run.failed += 1;
                run.first_error.get_or_insert(e.to_string());
            }
        }
    }
    run.secs = wall.elapsed().as_secs_f64();
    run
}

/// Runs `op(i)` for `i in 0..n` with up to `concurrency` at once; the first
/// error ends it.
pub async fn for_each_concurrent<F, Fut>(n: usize, concurrency: usize, op: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    use futures::{StreamExt, TryStreamExt};
    futures::stream::iter((0..n).map(op))
        .buffer_unordered(concurrency.max(1))
        .try_collect::<()>()
        .await
}
