//! The phases of one case, the same for every client: pre-create keys,
//! no-watch put baseline, a quiet window with no watch (the control of the
//! steady one), open N watches, idle, the baseline's puts again
//! on other unwatched keys, paced puts of the watched keys, drain.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use futures::future::BoxFuture;

use crate::{
    measure::{self, Slots, Span},
    sides,
    spec::{CaseResult, CaseSpec, Kind, Side},
};

/// Bound of one put (a put that takes longer counts as failed).
const PUT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause before memory and socket readings, so that connections opened and
/// buffers freed by the previous phase have settled.
const SETTLE: Duration = Duration::from_millis(300);

/// What the watches saw, shared by the consumers of one case.
pub struct Seen {
    /// Arrival time of the first event of each watch.
    pub first: Arc<Slots>,
    /// Watches the server confirmed (raw etcd: `created` responses).
    pub created: AtomicU64,
    errors: AtomicU64,
    extra: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Seen {
    /// Nothing seen yet by `n` watches.
    pub fn new(n: usize) -> Arc<Seen> {
        Arc::new(Seen {
            first: Slots::new(n),
            created: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            extra: AtomicU64::new(0),
            first_error: Mutex::new(None),
        })
    }

    /// An event on watch `i`; `expected` when it names the key the writer puts for it.
    pub fn event(&self, i: usize, expected: bool) {
        if !expected || !self.first.mark(i) {
            self.extra.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Error items seen so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// An error item on a watch.
    pub fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert(message);
        }
    }
}

/// Aborts a task when dropped (ends a consumer together with its watches).
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whatever keeps the watches of a case open; dropping it ends them.
pub type Holder = Box<dyn Send>;

/// One client under test.
pub trait Client: Send + Sync {
    /// Creates the watched keys (before any watch) if the case wants them.
    fn prepare(&self) -> BoxFuture<'_, Result<()>>;
    /// The writer's put of the key watched by watch `i`.
    fn put(&self, i: usize) -> BoxFuture<'static, Result<()>>;
    /// The writer's put of an unwatched key (the no-watch latency baseline).
    fn base_put(&self, i: usize) -> BoxFuture<'static, Result<()>>;
    /// Opens the N watches and starts consuming them, reporting into `seen`;
    /// returns once every watch is established.
    fn setup(&self, seen: Arc<Seen>) -> BoxFuture<'_, Result<Holder>>;
    /// Removes the case's keys and closes the clients.
    fn cleanup(&self) -> BoxFuture<'_, ()>;
}

/// The key names a case uses, relative to its namespace/root.
pub struct Names {
    /// Key or prefix watches.
    pub kind: Kind,
}

impl Names {
    /// The watched key (key targets) or prefix (prefix targets) of watch `i`.
    pub fn target(&self, i: usize) -> String {
        match self.kind {
            Kind::Key => format!("k/{i:05}"),
            Kind::Prefix => format!("p/{i:05}"),
        }
    }

    /// The key the writer puts for watch `i`.
    pub fn put_key(&self, i: usize) -> String {
        match self.kind {
            Kind::Key => format!("k/{i:05}"),
            Kind::Prefix => format!("p/{i:05}/x"),
        }
    }

    /// The unwatched key the no-watch baseline puts for `i`: `put_key(i)`'s
    /// shape under another root, created beforehand when the watched keys
    /// are ([`Names::base_target`] too, where a side creates prefixes), so
    /// that the baseline is the same put: a key below a prefix that does
    /// not exist yet creates that parent too on ZooKeeper, and a put on a
    /// key that exists is an update, not a create.
    pub fn base_key(&self, i: usize) -> String {
        format!("base/{}", self.put_key(i))
    }

    /// [`Names::target`]'s counterpart for the baseline's keys.
    pub fn base_target(&self, i: usize) -> String {
        format!("base/{}", self.target(i))
    }

    /// Key `i` of the case's writes, for the cleanup: the N put keys, then
    /// the baseline's. The cleanup deletes them one by one, never as one
    /// range: etcd 3.4 keeps its write buffer as large as the largest batch
    /// it held, and copies the whole buffer for every watch create after
    /// that (measured: ~0.45 ms of etcd CPU per create after one
    /// 10,000-key delete), so the next case's setup would pay for this
    /// case's cleanup.
    pub fn case_key(&self, i: usize, n: usize) -> String {
        if i < n {
            self.put_key(i)
        } else {
            self.base_key(i - n)
        }
    }
}

/// Runs a case; a failure is reported in the result with the figures so far.
pub async fn run(spec: &CaseSpec) -> CaseResult {
    let mut r = CaseResult::default();
    if let Err(e) = phases(spec, &mut r).await {
        r.error = Some(format!("{e:#}"));
    }
    r
}

async fn phases(spec: &CaseSpec, r: &mut CaseResult) -> Result<()> {
    let step = Duration::from_secs_f64(spec.step_timeout_secs);
    let client: Box<dyn Client> = tokio::time::timeout(step, connect(spec))
        .await
        .context("connecting: timed out")??;
    let out = measured(spec, r, client.as_ref(), step).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), client.cleanup()).await;
    out
}

async fn connect(spec: &CaseSpec) -> Result<Box<dyn Client>> {
    Ok(match spec.side {
        Side::Anykv => Box::new(sides::anykv::AnykvClient::connect(spec).await?),
        Side::EtcdOneStream | Side::EtcdStreamPerWatch => {
            Box::new(sides::etcd::EtcdRaw::connect(spec).await?)
        }
        Side::ZkRaw => Box::new(sides::zk::ZkRaw::connect(spec).await?),
    })
}

async fn measured(
    spec: &CaseSpec,
    r: &mut CaseResult,
    client: &dyn Client,
    step: Duration,
) -> Result<()> {
    tokio::time::timeout(step, client.prepare())
        .await
        .context("pre-creating the watched keys: timed out")?
        .context("pre-creating the watched keys")?;

    r.base_put = unwatched_puts(spec, client, 0)
        .await
        .context("no-watch puts")?;

    if spec.steady_secs > 0.0 && spec.server_pid.is_some() {
        // The steady window's control: the same wait and window with no
        // watch open. A server keeps busy on its own for a while after
        // writes (the baseline's here), which a baseline taken once per
        // run would count against the watches.
        quiet(spec.server_pid).await;
        r.control_server_cpu = idle_cpu(spec.steady_secs, spec.server_pid).await.1;
    }
    tokio::time::sleep(SETTLE).await;
    r.rss_before = measure::rss_bytes();
    let heap_before = crate::heap_bytes();
    r.sockets.0 = measure::sockets();
    let seen = Seen::new(spec.n);
    let span = Span::start();
    let holder = tokio::time::timeout(step, client.setup(seen.clone()))
        .await
        .with_context(|| format!("opening {} watches: timed out after {step:?}", spec.n))?
        .with_context(|| format!("opening {} watches", spec.n))?;
    let (wall, cpu) = span.stop();
    r.setup_ms = Some(wall);
    r.setup_cpu_ms = cpu;

    tokio::time::sleep(SETTLE).await;
    let rss_after = measure::rss_bytes();
    r.rss_per_watch = Some((rss_after as f64 - r.rss_before as f64) / spec.n as f64);
    r.heap_per_watch = Some((crate::heap_bytes() as f64 - heap_before as f64) / spec.n as f64);
    r.sockets.1 = measure::sockets();

    (r.idle_client_cpu, r.idle_server_cpu) = idle_cpu(spec.idle_secs, spec.server_pid).await;
    if spec.steady_secs > 0.0 {
        r.quiet_after_secs = quiet(spec.server_pid).await;
        (r.steady_client_cpu, r.steady_server_cpu) =
            idle_cpu(spec.steady_secs, spec.server_pid).await;
    }
    // After the idle windows, which they would disturb.
    r.idle_put = unwatched_puts(spec, client, spec.base_puts)
        .await
        .context("unwatched puts, watches open")?;

    let puts = spec.puts();
    let span = Span::start();
    let run = measure::paced_puts(puts, spec.rate, PUT_TIMEOUT, |i| client.put(i)).await;
    let acked = run.acks.filled(puts);
    let drain = Instant::now() + Duration::from_secs_f64(spec.drain_secs);
    while seen.first.filled(puts) < acked && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.put_cpu_ms = span.stop().1;
    r.put = measure::percentiles(run.latencies_ms);
    r.put_failures = run.failed;
    r.put_secs = run.secs;
    r.expected = puts as u64;
    r.delivered = seen.first.filled(puts);
    let delays: Vec<f64> = (0..puts)
        .filter_map(|i| {
            let (ack, event) = (run.acks.get(i), seen.first.get(i));
            (ack != 0 && event != 0).then(|| event.saturating_sub(ack) as f64 / 1e6)
        })
        .collect();
    r.delay = measure::percentiles(delays);
    r.watch_errors = seen.errors.load(Ordering::Relaxed);
    r.extra_events = seen.extra.load(Ordering::Relaxed);
    r.first_watch_error = seen.first_error.lock().ok().and_then(|e| e.clone());
    drop(holder);
    if let Some(e) = run.first_error {
        anyhow::bail!("{} of {puts} puts failed, first: {e}", run.failed);
    }
    Ok(())
}

/// The no-watch baseline's paced puts, on the unwatched keys from `first`
/// on; their latency p50 / p99 / max.
async fn unwatched_puts(
    spec: &CaseSpec,
    client: &dyn Client,
    first: usize,
) -> Result<Option<(f64, f64, f64)>> {
    let run = measure::paced_puts(spec.base_puts, spec.rate, PUT_TIMEOUT, |i| {
        client.base_put(first + i)
    })
    .await;
    if let Some(e) = run.first_error {
        anyhow::bail!("{} failed, first: {e}", run.failed);
    }
    Ok(measure::percentiles(run.latencies_ms))
}

/// CPU ms per second of wall time of this process and of the server over
/// the next `secs` of idling.
async fn idle_cpu(secs: f64, server: Option<u32>) -> (Option<f64>, Option<f64>) {
    let server_ms = || server.and_then(|p| measure::cpu_ms(Some(p)));
    let (c0, s0, t0) = (measure::cpu_ms(None), server_ms(), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let secs = t0.elapsed().as_secs_f64();
    let per_s = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / secs);
    (per_s(c0, measure::cpu_ms(None)), per_s(s0, server_ms()))
}

/// A second of server CPU at or below this counts as quiet (ms; the
/// clock ticks by 10 ms).
const QUIET_MS: f64 = 20.0;
/// Quiet seconds in a row that end the wait.
const QUIET_RUN: u32 = 5;
/// The wait's bound.
const QUIET_MAX: Duration = Duration::from_secs(60);

/// Waits until the server has burned at most [`QUIET_MS`] of CPU in each of
/// [`QUIET_RUN`] seconds in a row, or [`QUIET_MAX`] at most; returns how
/// long it waited. A server keeps working on its own for a while after a
/// burst of writes (the Consul dev agent: 30–210 ms/s for ~30 s after
/// 15,000 puts with no client connected at all), which is not what open
/// watches cost; watches that keep a server busy never let it be quiet,
/// and the window after the bound shows it.
async fn quiet(server: Option<u32>) -> Option<f64> {
    let pid = server?;
    let start = Instant::now();
    let mut run = 0;
    while run < QUIET_RUN && start.elapsed() < QUIET_MAX {
        let before = measure::cpu_ms(Some(pid))?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let used = measure::cpu_ms(Some(pid))? - before;
        run = if used <= QUIET_MS { run + 1 } else { 0 };
    }
    Some(start.elapsed().as_secs_f64())
}
