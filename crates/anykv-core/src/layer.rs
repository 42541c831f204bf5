//! The standard layers, composed the same way around every driver:
//!
//! namespace → capability checks → tracing span → liveness → retry → timeout → driver
//!
//! The timeout applies to each attempt inside the retry loop, not to the loop.
//! Checks run before liveness so that a rejected argument, which never reached
//! the backend, says nothing about its health.

use std::{
    collections::HashSet,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::{task::JoinHandle, time::Instant};
use tracing::Instrument;

use crate::{
    capability::Capabilities,
    error::{Error, Result},
    held_locks::HeldLocks,
    key::{Key, Prefix, RESERVED_ROOT},
    liveness::{DEFAULT_LIVENESS_INTERVAL, LivenessMonitor},
    lock::LockGuard,
    store::{PairStream, Store, WatchStream},
    types::{
        Check, Condition, Event, KvPair, LockInfo, LockOptions, Op, PutOptions, Revision, Snapshot,
        Start, Target, Version,
    },
};

/// Retry with exponential backoff, for idempotent operations and retryable errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1: no retry).
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub initial_backoff: Duration,
    /// Upper bound of one delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        exp.min(self.max_backoff)
    }
}

/// Settings of the layers around a driver (from the URL's common options).
#[derive(Clone, Debug)]
pub struct LayerConfig {
    /// Namespace every key is scoped to.
    pub namespace: Prefix,
    /// Deadline of one attempt of one operation (`?timeout=`).
    pub timeout: Duration,
    /// Retry policy (`?retries=` sets `max_attempts - 1`).
    pub retry: RetryPolicy,
    /// Re-post period of the liveness monitor (`?liveness_interval=`).
    pub liveness_interval: Duration,
    /// Background probe period, off by default (`?probe_interval=`).
    pub probe_interval: Option<Duration>,
}

impl Default for LayerConfig {
    fn default() -> Self {
        LayerConfig {
            namespace: Prefix::root(),
            timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            liveness_interval: DEFAULT_LIVENESS_INTERVAL,
            probe_interval: None,
        }
    }
}

/// A driver wrapped in the standard layers: the handle applications use.
///
/// Cheap to clone; clones share the driver, the liveness monitor and the
/// background prober. `Kv` implements [`Store`] with keys relative to its
/// namespace.
///
/// ```no_run
/// # async fn demo(driver: std::sync::Arc<dyn anykv_core::Store>) -> anykv_core::Result<()> {
/// use anykv_core::{Kv, LayerConfig, Key, Store};
/// let kv = Kv::new(driver, LayerConfig::default());
/// let key = Key::new("greeting")?;
/// kv.put(&key, "hello".into(), Default::default()).await?;
/// assert_eq!(kv.get(&key).await?.map(|p| p.value), Some("hello".into()));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Kv {
    inner: Arc<KvInner>,
}

struct KvInner {
    driver: Arc<dyn Store>,
    backend: &'static str,
    caps: Capabilities,
    cfg: LayerConfig,
    liveness: Arc<LivenessMonitor>,
    prober: Mutex<Option<JoinHandle<()>>>,
    /// Set by `close()`: ends this handle's watch streams and refuses
    /// further operations.
    closed: tokio::sync::watch::Sender<bool>,
    /// Scoped views share the driver and must not close it.
    owns_driver: bool,
    /// Locks taken through this handle, released by `close()`.
    locks: Arc<HeldLocks>,
    /// Probes the backend while watches are open (see [`Kv::watchdog_enter`]).
    watchdog: Mutex<Watchdog>,
}

/// Open watch streams of one handle and the probe task they keep running.
#[derive(Default)]
struct Watchdog {
    open: usize,
    task: Option<JoinHandle<()>>,
}

/// Held by an open watch stream; the last one dropped stops the probe task.
struct WatchTicket {
    inner: std::sync::Weak<KvInner>,
}

impl Drop for WatchTicket {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let mut w = inner.watchdog.lock().unwrap_or_else(|p| p.into_inner());
        w.open = w.open.saturating_sub(1);
        if w.open == 0
            && let Some(task) = w.task.take()
        {
            task.abort();
        }
    }
}

impl Drop for KvInner {
    fn drop(&mut self) {
        if let Some(h) = self.prober.get_mut().ok().and_then(Option::take) {
            h.abort();
        }
        if let Some(h) = self.watchdog.get_mut().ok().and_then(|w| w.task.take()) {
            h.abort();
        }
    }
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv")
            .field("backend", &self.inner.backend)
            .field("namespace", &self.inner.cfg.namespace)
            .field("alive", &self.inner.liveness.is_alive())
            .finish()
    }
}

impl Kv {
    /// Wraps `driver` in the standard layers. Starts the background prober if
    /// `cfg.probe_interval` is set (needs a tokio runtime).
    pub fn new(driver: Arc<dyn Store>, cfg: LayerConfig) -> Kv {
        let kv = Kv {
            inner: Arc::new(KvInner {
                backend: driver.backend(),
                caps: driver.capabilities().clone(),
                liveness: Arc::new(LivenessMonitor::new(cfg.liveness_interval)),
                driver,
                cfg,
                prober: Mutex::new(None),
                closed: tokio::sync::watch::Sender::new(false),
                owns_driver: true,
                locks: Arc::default(),
                watchdog: Mutex::default(),
            }),
        };
        if let Some(every) = kv.inner.cfg.probe_interval {
            kv.start_prober(every);
        }
        kv
    }

    /// The liveness monitor fed by every operation of this store.
    pub fn liveness(&self) -> &Arc<LivenessMonitor> {
        &self.inner.liveness
    }

    /// The namespace keys are scoped to.
    pub fn namespace(&self) -> &Prefix {
        &self.inner.cfg.namespace
    }

    /// The layer settings.
    pub fn config(&self) -> &LayerConfig {
        &self.inner.cfg
    }

    /// A view of the same driver scoped to a sub-namespace, with its own
    /// liveness monitor. Closing the view ends its watches but leaves the
    /// driver open for the other handles.
    pub fn scoped(&self, sub: &Prefix) -> Kv {
        let mut cfg = self.inner.cfg.clone();
        cfg.namespace = cfg.namespace.join_prefix(sub);
        cfg.probe_interval = None;
        Kv {
            inner: Arc::new(KvInner {
                driver: self.inner.driver.clone(),
                backend: self.inner.backend,
                caps: self.inner.caps.clone(),
                liveness: Arc::new(LivenessMonitor::new(cfg.liveness_interval)),
                cfg,
                prober: Mutex::new(None),
                closed: tokio::sync::watch::Sender::new(false),
                owns_driver: false,
                locks: Arc::default(),
                watchdog: Mutex::default(),
            }),
        }
    }

    /// Probes the backend every `every` in the background, so that liveness
    /// moves without traffic. Replaces a running prober.
    pub fn start_prober(&self, every: Duration) {
        let Some(task) = self.spawn_probe_loop(every) else {
            tracing::warn!("no tokio runtime: background liveness prober not started");
            return;
        };
        let mut slot = self.inner.prober.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.replace(task) {
            old.abort();
        }
    }

    /// A task probing the backend every `every` until the handle is gone
    /// (`None` without a tokio runtime). Used by the background prober and
    /// the watchdog.
    fn spawn_probe_loop(&self, every: Duration) -> Option<JoinHandle<()>> {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let weak = Arc::downgrade(&self.inner);
        Some(rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let _ = Kv { inner }.probe().await;
            }
        }))
    }

    /// Counts an open watch stream; the first one starts a task that probes
    /// the backend every `timeout`. A watch whose backend stops answering
    /// may itself see nothing (a frozen server, a blocking query that never
    /// returns), so the probe turns liveness not-alive within 2 × timeout of
    /// an outage and every open watch yields `Err(Unavailable)` then.
    fn watchdog_enter(&self) -> WatchTicket {
        let mut w = self
            .inner
            .watchdog
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        w.open += 1;
        if w.task.is_none() {
            w.task = self.spawn_probe_loop(self.inner.cfg.timeout);
        }
        WatchTicket {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Registers a driver's guard with this handle (see [`HeldLocks`]).
    fn track(&self, guard: LockGuard) -> LockGuard {
        self.inner
            .locks
            .track(guard, self.inner.backend, self.inner.cfg.timeout)
    }

    fn ensure_open(&self) -> Result<()> {
        if *self.inner.closed.borrow() {
            return Err(self.closed_error());
        }
        Ok(())
    }

    /// What an operation or a watch of a closed handle gets.
    fn closed_error(&self) -> Error {
        Error::Cancelled {
            backend: self.inner.backend,
            message: "store handle closed".into(),
        }
    }

    /// An `Unavailable` the layer itself reports on a watch.
    fn watch_unavailable(&self, message: &str) -> Error {
        Error::Unavailable {
            backend: self.inner.backend,
            message: message.into(),
            source: None,
        }
    }

    // ---- namespace mapping -------------------------------------------------

    fn to_inner(&self, key: &Key) -> Key {
        self.inner.cfg.namespace.join(key)
    }

    fn prefix_to_inner(&self, prefix: &Prefix) -> Prefix {
        self.inner.cfg.namespace.join_prefix(prefix)
    }

    fn lock_key(&self, key: &Key) -> Key {
        Key::lock_record(&self.inner.cfg.namespace, key)
    }

    /// Maps a driver's key back to the caller's; `None` for keys outside the
    /// namespace or under the reserved root, which callers never see.
    fn to_outer(&self, key: &Key) -> Option<Key> {
        let outer = self.inner.cfg.namespace.strip(key)?;
        (outer.as_str().split('/').next() != Some(RESERVED_ROOT)).then_some(outer)
    }

    fn pair_to_outer(&self, mut kv: KvPair) -> Option<KvPair> {
        kv.key = self.to_outer(&kv.key)?;
        Some(kv)
    }

    fn error_to_outer(&self, e: Error) -> Error {
        let ns = self.inner.cfg.namespace.dir();
        let locks = format!("{RESERVED_ROOT}/locks/{ns}");
        e.map_key(|k| {
            k.strip_prefix(&locks)
                .or_else(|| k.strip_prefix(&ns))
                .unwrap_or(k)
                .to_owned()
        })
    }

    // ---- checks done before the driver --------------------------------------

    fn check_value(&self, key: &Key, value: &Bytes) -> Result<()> {
        let max = self.inner.caps.max_value_size;
        if value.len() > max {
            return Err(Error::ValueTooLarge {
                backend: self.inner.backend,
                key: key.to_string(),
                size: value.len(),
                max,
            });
        }
        Ok(())
    }

    fn check_ttl(&self, ttl: Option<Duration>) -> Result<()> {
        match ttl {
            None => Ok(()),
            Some(_) if self.inner.caps.ttl.is_none() => Err(Error::Unsupported {
                backend: self.inner.backend,
                operation: "ttl",
            }),
            Some(t) if t.is_zero() => Err(self.invalid_argument("ttl must be positive")),
            Some(_) => Ok(()),
        }
    }

    fn check_locks(&self, operation: &'static str) -> Result<()> {
        if self.inner.caps.locks {
            Ok(())
        } else {
            Err(Error::Unsupported {
                backend: self.inner.backend,
                operation,
            })
        }
    }

    fn invalid_argument(&self, message: impl Into<String>) -> Error {
        Error::InvalidArgument {
            backend: self.inner.backend,
            message: message.into(),
        }
    }

    // ---- the call path: tracing → liveness → retry → timeout ----------------

    async fn call<T, F, Fut>(
        &self,
        operation: &'static str,
        key: Option<&str>,
        idempotent: bool,
        mut attempt_fn: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.ensure_open()?;
        let inner = &self.inner;
        let span = tracing::debug_span!(
            "anykv",
            backend = inner.backend,
            operation,
            key = key.unwrap_or(""),
        );
        async {
            let started = Instant::now();
            let policy = &inner.cfg.retry;
            let mut attempt = 1;
            let outcome = loop {
                let result = match tokio::time::timeout(inner.cfg.timeout, attempt_fn()).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::Timeout {
                        backend: inner.backend,
                        operation,
                        after: inner.cfg.timeout,
                    }),
                };
                match result {
                    // A write is retried only when it provably never reached
                    // the server: one that timed out may have been applied.
                    Err(e)
                        if (e.never_reached_server() || idempotent && e.is_retryable())
                            && attempt < policy.max_attempts =>
                    {
                        tracing::debug!(attempt, error = %e, "retrying");
                        tokio::time::sleep(policy.backoff(attempt)).await;
                        attempt += 1;
                    }
                    other => break other,
                }
            };
            inner.liveness.record(&outcome);
            let latency_us = started.elapsed().as_micros() as u64;
            match &outcome {
                Ok(_) => tracing::debug!(latency_us, attempt, outcome = "ok"),
                Err(e) => tracing::debug!(latency_us, attempt, outcome = ?e.kind(), error = %e),
            }
            outcome.map_err(|e| self.error_to_outer(e))
        }
        .instrument(span)
        .await
    }

    /// Maps a driver's stream to the caller's keys, feeds stream errors to
    /// the liveness monitor, ends with `Err(Cancelled)` when this handle is
    /// closed, and turns a driver stream that ends on its own (which the
    /// contract forbids for watches) into a final `Err(Unavailable)`.
    ///
    /// A watch (`endless`) also yields one non-terminal `Err(Unavailable)`
    /// when liveness turns not-alive (the [watchdog](Kv::watchdog_enter)
    /// probes while watches are open), unless the driver already said so;
    /// it stays open and goes on once the driver resumes.
    fn outer_stream<T: Send + 'static>(
        &self,
        stream: futures::stream::BoxStream<'static, Result<T>>,
        endless: bool,
        map: impl Fn(&Kv, T) -> Option<T> + Send + Sync + 'static,
    ) -> futures::stream::BoxStream<'static, Result<T>> {
        struct St<T> {
            kv: Kv,
            inner: futures::stream::BoxStream<'static, Result<T>>,
            closed: tokio::sync::watch::Receiver<bool>,
            done: bool,
            /// The last item was an error: ending after it is a clean end.
            after_error: bool,
            /// Liveness, for watches; `signalled` once this outage was reported.
            alive: Option<tokio::sync::watch::Receiver<bool>>,
            signalled: bool,
            _ticket: Option<WatchTicket>,
        }
        let st = St {
            kv: self.clone(),
            inner: stream,
            closed: self.inner.closed.subscribe(),
            done: false,
            after_error: false,
            alive: endless.then(|| self.inner.liveness.state()),
            signalled: false,
            _ticket: endless.then(|| self.watchdog_enter()),
        };
        futures::stream::unfold((st, map), move |(mut st, map)| async move {
            if st.done {
                return None;
            }
            loop {
                // Reported outage: wait for alive again; else for not-alive.
                let want = st.signalled;
                let alive = async {
                    match st.alive.as_mut() {
                        Some(rx) => rx.wait_for(|a| *a == want).await.is_ok(),
                        None => futures::future::pending().await,
                    }
                };
                let item = tokio::select! {
                    biased;
                    _ = st.closed.wait_for(|c| *c) => None,
                    changed = alive => Some(Err(changed)),
                    item = st.inner.next() => Some(Ok(item)),
                };
                let item = match item {
                    Some(Ok(item)) => Some(item),
                    None => None,
                    Some(Err(changed)) => {
                        if !changed {
                            st.alive = None; // monitor gone: nothing more to report
                        } else if want {
                            st.signalled = false;
                        } else {
                            st.signalled = true;
                            let e = st.kv.watch_unavailable(
                                "backend unreachable; the watch resumes by itself",
                            );
                            return Some((Err(e), (st, map)));
                        }
                        continue;
                    }
                };
                let Some(item) = item else {
                    st.done = true;
                    return Some((Err(st.kv.closed_error()), (st, map)));
                };
                match item {
                    Some(Ok(v)) => {
                        st.after_error = false;
                        if let Some(v) = map(&st.kv, v) {
                            return Some((Ok(v), (st, map)));
                        }
                    }
                    Some(Err(e)) => {
                        st.kv.inner.liveness.set(!e.indicates_unreachable());
                        st.signalled |= e.indicates_unreachable();
                        st.after_error = true;
                        return Some((Err(st.kv.error_to_outer(e)), (st, map)));
                    }
                    None if endless && !st.after_error => {
                        st.done = true;
                        let e = st.kv.watch_unavailable("watch stream ended unexpectedly");
                        return Some((Err(e), (st, map)));
                    }
                    None => return None,
                }
            }
        })
        .boxed()
    }
}

/// Sorted prefixes with every prefix covered by another dropped, so a driver
/// never reads a key twice.
fn disjoint(mut prefixes: Vec<Prefix>) -> Vec<Prefix> {
    prefixes.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    prefixes.dedup();
    let all = prefixes.clone();
    prefixes.retain(|p| !all.iter().any(|q| q != p && q.covers(p)));
    prefixes
}

#[async_trait]
impl Store for Kv {
    fn backend(&self) -> &'static str {
        self.inner.backend
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn get(&self, key: &Key) -> Result<Option<KvPair>> {
        let k = self.to_inner(key);
        let found = self
            .call("get", Some(key.as_str()), true, || {
                self.inner.driver.get(&k)
            })
            .await?;
        Ok(found.and_then(|kv| self.pair_to_outer(kv)))
    }

    async fn put(&self, key: &Key, value: Bytes, opts: PutOptions) -> Result<Version> {
        self.check_value(key, &value)?;
        self.check_ttl(opts.ttl)?;
        let k = self.to_inner(key);
        // Not idempotent, even unconditional: a retried put that had been
        // applied would write a second version (and a second event).
        self.call("put", Some(key.as_str()), false, || {
            self.inner.driver.put(&k, value.clone(), opts)
        })
        .await
    }

    async fn delete(&self, key: &Key, condition: Condition) -> Result<bool> {
        if condition == Condition::IfAbsent {
            return Err(self.invalid_argument("delete cannot be conditional on absence"));
        }
        let k = self.to_inner(key);
        self.call("delete", Some(key.as_str()), false, || {
            self.inner.driver.delete(&k, condition)
        })
        .await
    }

    async fn exists(&self, key: &Key) -> Result<bool> {
        let k = self.to_inner(key);
        self.call("exists", Some(key.as_str()), true, || {
            self.inner.driver.exists(&k)
        })
        .await
    }

    async fn list(&self, prefix: &Prefix) -> Result<Vec<KvPair>> {
        let p = self.prefix_to_inner(prefix);
        let pairs = self
            .call("list", Some(prefix.as_str()), true, || {
                self.inner.driver.list(&p)
            })
            .await?;
        Ok(pairs
            .into_iter()
            .filter_map(|kv| self.pair_to_outer(kv))
            .collect())
    }

    async fn keys(&self, prefix: &Prefix) -> Result<Vec<String>> {
        let p = self.prefix_to_inner(prefix);
        let mut names = self
            .call("keys", Some(prefix.as_str()), true, || {
                self.inner.driver.keys(&p)
            })
            .await?;
        if p.is_root() {
            names.retain(|n| n != RESERVED_ROOT);
        }
        Ok(names)
    }

    async fn delete_prefix(&self, prefix: &Prefix) -> Result<u64> {
        let p = self.prefix_to_inner(prefix);
        if !p.is_root() {
            return self
                .call("delete_prefix", Some(prefix.as_str()), false, || {
                    self.inner.driver.delete_prefix(&p)
                })
                .await;
        }
        // The whole backend: spare anykv's own records (held locks) by
        // deleting each top-level name but the reserved one.
        let mut total = 0;
        for name in self.keys(prefix).await? {
            let Ok(top) = Prefix::new(name) else { continue };
            total += self
                .call("delete_prefix", Some(top.as_str()), false, || {
                    self.inner.driver.delete_prefix(&top)
                })
                .await?;
            let Ok(k) = Key::new(top.as_str()) else {
                continue;
            };
            if self
                .call("delete", Some(k.as_str()), false, || {
                    self.inner.driver.delete(&k, Condition::Always)
                })
                .await?
            {
                total += 1;
            }
        }
        Ok(total)
    }

    async fn watch(&self, target: Target, start: Start) -> Result<WatchStream> {
        let (shown, inner_target) = match &target {
            Target::Key(k) => (k.to_string(), Target::Key(self.to_inner(k))),
            Target::Prefix(p) => (p.to_string(), Target::Prefix(self.prefix_to_inner(p))),
        };
        let stream = self
            .call("watch", Some(&shown), true, || {
                self.inner.driver.watch(inner_target.clone(), start)
            })
            .await?;
        Ok(self.outer_stream(stream, true, |kv, ev| match ev {
            Event::Put { kv: pair, prev } => Some(Event::Put {
                kv: kv.pair_to_outer(pair)?,
                prev: prev.and_then(|p| kv.pair_to_outer(p)),
            }),
            Event::Delete { key, revision } => Some(Event::Delete {
                key: kv.to_outer(&key)?,
                revision,
            }),
        }))
    }

    async fn lock(&self, key: &Key, opts: LockOptions) -> Result<LockGuard> {
        self.ensure_open()?;
        self.check_locks("lock")?;
        if opts.ttl.is_zero() {
            return Err(self.invalid_argument("lock ttl must be positive"));
        }
        let k = self.lock_key(key);
        let span = tracing::debug_span!(
            "anykv",
            backend = self.inner.backend,
            operation = "lock",
            key = key.as_str()
        );
        // Waiting for a lock is not bounded by the per-operation timeout:
        // `opts.wait` is, plus one timeout for the final round trip.
        let outcome = match opts.wait {
            None => {
                self.inner
                    .driver
                    .lock(&k, opts.clone())
                    .instrument(span)
                    .await
            }
            Some(wait) => {
                let limit = wait.saturating_add(self.inner.cfg.timeout);
                match tokio::time::timeout(
                    limit,
                    self.inner.driver.lock(&k, opts.clone()).instrument(span),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(Error::Timeout {
                        backend: self.inner.backend,
                        operation: "lock",
                        after: wait,
                    }),
                }
            }
        };
        // Running out of wait while the lock is held proves the backend answered.
        if !matches!(&outcome, Err(Error::Timeout { .. })) {
            self.inner.liveness.record(&outcome);
        }
        outcome
            .map(|g| self.track(g.with_key(key.clone())))
            .map_err(|e| self.error_to_outer(e))
    }

    async fn try_lock(&self, key: &Key, opts: LockOptions) -> Result<Option<LockGuard>> {
        self.check_locks("try_lock")?;
        if opts.ttl.is_zero() {
            return Err(self.invalid_argument("lock ttl must be positive"));
        }
        let k = self.lock_key(key);
        let guard = self
            .call("try_lock", Some(key.as_str()), false, || {
                self.inner.driver.try_lock(&k, opts.clone())
            })
            .await?;
        Ok(guard.map(|g| self.track(g.with_key(key.clone()))))
    }

    async fn lock_holder(&self, key: &Key) -> Result<Option<LockInfo>> {
        self.check_locks("lock_holder")?;
        let k = self.lock_key(key);
        self.call("lock_holder", Some(key.as_str()), true, || {
            self.inner.driver.lock_holder(&k)
        })
        .await
    }

    async fn atomic(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<Revision> {
        if let Some(max) = self.inner.caps.max_atomic_ops
            && checks.len() + ops.len() > max
        {
            return Err(self.invalid_argument(format!(
                "atomic has {} checks and operations; this backend takes at most {max}",
                checks.len() + ops.len()
            )));
        }
        let mut written = HashSet::new();
        for op in &ops {
            if !written.insert(op.key().as_str()) {
                return Err(self.invalid_argument(format!("atomic writes {} twice", op.key())));
            }
            if let Op::Put(k, v) = op {
                self.check_value(k, v)?;
            }
        }
        let checks: Vec<Check> = checks
            .into_iter()
            .map(|c| match c {
                Check::Exists(k) => Check::Exists(self.to_inner(&k)),
                Check::Absent(k) => Check::Absent(self.to_inner(&k)),
                Check::Version(k, v) => Check::Version(self.to_inner(&k), v),
                Check::Value(k, v) => Check::Value(self.to_inner(&k), v),
            })
            .collect();
        let ops: Vec<Op> = ops
            .into_iter()
            .map(|o| match o {
                Op::Put(k, v) => Op::Put(self.to_inner(&k), v),
                Op::Delete(k) => Op::Delete(self.to_inner(&k)),
            })
            .collect();
        self.call("atomic", None, false, || {
            self.inner.driver.atomic(checks.clone(), ops.clone())
        })
        .await
    }

    async fn snapshot(&self, prefixes: &[Prefix]) -> Result<Snapshot> {
        if self.inner.caps.snapshot.is_none() {
            return Err(Error::Unsupported {
                backend: self.inner.backend,
                operation: "snapshot",
            });
        }
        if prefixes.is_empty() {
            return Err(self.invalid_argument("snapshot needs at least one prefix"));
        }
        let inner = disjoint(prefixes.iter().map(|p| self.prefix_to_inner(p)).collect());
        let shown = prefixes
            .iter()
            .map(Prefix::as_str)
            .collect::<Vec<_>>()
            .join(",");
        let snap = self
            .call("snapshot", Some(&shown), true, || {
                self.inner.driver.snapshot(&inner)
            })
            .await?;
        let mut pairs: Vec<KvPair> = snap
            .pairs
            .into_iter()
            .filter_map(|kv| self.pair_to_outer(kv))
            .collect();
        pairs.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
        pairs.dedup_by(|a, b| a.key == b.key);
        Ok(Snapshot {
            revision: snap.revision,
            pairs,
        })
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        if !self.inner.caps.compact {
            return Err(Error::Unsupported {
                backend: self.inner.backend,
                operation: "compact",
            });
        }
        // Idempotent: compacting twice at one revision is a no-op.
        self.call("compact", None, true, || {
            self.inner.driver.compact(revision)
        })
        .await
    }

    async fn export(&self, prefix: &Prefix) -> Result<PairStream> {
        let p = self.prefix_to_inner(prefix);
        let stream = self
            .call("export", Some(prefix.as_str()), true, || {
                self.inner.driver.export(&p)
            })
            .await?;
        Ok(self.outer_stream(stream, false, |kv, pair| kv.pair_to_outer(pair)))
    }

    async fn import(&self, pairs: PairStream) -> Result<u64> {
        let kv = self.clone();
        let mapped = pairs
            .and_then(move |mut pair| {
                let checked = kv.check_value(&pair.key, &pair.value).map(|()| {
                    pair.key = kv.to_inner(&pair.key);
                    pair
                });
                futures::future::ready(checked)
            })
            .boxed();
        // One call: retrying would need to replay a consumed stream.
        let mut once = Some(mapped);
        self.call("import", None, false, || {
            let s = once.take();
            async move {
                match s {
                    Some(s) => self.inner.driver.import(s).await,
                    None => Err(self.invalid_argument("import stream already consumed")),
                }
            }
        })
        .await
    }

    async fn probe(&self) -> Result<()> {
        self.call("probe", None, false, || self.inner.driver.probe())
            .await
    }

    /// Ends this handle's watch streams (each yields `Err(Cancelled)`),
    /// releases every lock taken through it (each guard's `lost()` fires),
    /// stops the prober and, unless this is a [`scoped`](Kv::scoped) view,
    /// closes the driver. Every later operation fails with `Cancelled`.
    async fn close(&self) -> Result<()> {
        self.inner.closed.send_replace(true);
        let prober = self
            .inner
            .prober
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = prober {
            h.abort();
        }
        let released = self
            .inner
            .locks
            .release_all(self.inner.backend, self.inner.cfg.timeout)
            .await;
        let closed = if self.inner.owns_driver {
            self.inner.driver.close().await
        } else {
            Ok(())
        };
        released.and(closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    use crate::ErrorKind;

    use futures::StreamExt;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1), Duration::from_millis(50));
        assert_eq!(p.backoff(2), Duration::from_millis(100));
        assert_eq!(p.backoff(30), Duration::from_secs(1));
    }

    /// How the fake answers: `hang` attempts hang, then `fail` attempts are
    /// Unavailable, then it succeeds.
    #[derive(Default)]
    struct Fake {
        hang: AtomicU32,
        fail: AtomicU32,
        calls: AtomicU32,
        caps: Option<Capabilities>,
        /// What `watch` streams, then the stream ends.
        watch_items: Mutex<Vec<Result<Event>>>,
        /// When set, `watch` streams from this channel instead (stays open).
        watch_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Result<Event>>>>,
        /// Failures that provably never reached the server.
        refuse: AtomicU32,
        /// Lock releases started, and whether they hang.
        releases: Arc<AtomicU32>,
        hang_release: bool,
    }

    /// A fake driver's lock release: counts, and hangs if asked to.
    struct FakeRelease {
        releases: Arc<AtomicU32>,
        hang: bool,
    }

    #[async_trait]
    impl crate::lock::LockRelease for FakeRelease {
        async fn release(self: Box<Self>) -> Result<()> {
            self.releases.fetch_add(1, Ordering::SeqCst);
            if self.hang {
                futures::future::pending::<()>().await;
            }
            Ok(())
        }
    }

    impl Fake {
        async fn answer(&self) -> Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) > 0 {
                self.hang.fetch_sub(1, Ordering::SeqCst);
                futures::future::pending::<()>().await;
            }
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::unavailable("fake", "down", "connection refused"));
            }
            if self.refuse.load(Ordering::SeqCst) > 0 {
                self.refuse.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::not_sent("fake", "down", "connection refused"));
            }
            Ok(())
        }
    }

    const FAKE_CAPS: Capabilities = Capabilities::full(8)
        .with_ttl(None)
        .with_locks(false, false);

    #[async_trait]
    impl Store for Fake {
        fn backend(&self) -> &'static str {
            "fake"
        }
        fn capabilities(&self) -> &Capabilities {
            self.caps.as_ref().unwrap_or(&FAKE_CAPS)
        }
        async fn get(&self, _: &Key) -> Result<Option<KvPair>> {
            self.answer().await.map(|()| None)
        }
        async fn put(&self, _: &Key, _: Bytes, _: PutOptions) -> Result<Version> {
            self.answer().await.map(|()| Version::new(1))
        }
        async fn delete(&self, _: &Key, _: Condition) -> Result<bool> {
            self.answer().await.map(|()| false)
        }
        async fn list(&self, _: &Prefix) -> Result<Vec<KvPair>> {
            self.answer().await.map(|()| Vec::new())
        }
        async fn delete_prefix(&self, _: &Prefix) -> Result<u64> {
            self.answer().await.map(|()| 0)
        }
        async fn probe(&self) -> Result<()> {
            self.answer().await
        }
        async fn watch(&self, _: Target, _: Start) -> Result<WatchStream> {
            if let Some(rx) = self.watch_rx.lock().unwrap().take() {
                return Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed());
            }
            let items = std::mem::take(&mut *self.watch_items.lock().unwrap());
            Ok(futures::stream::iter(items).boxed())
        }
        async fn lock(&self, key: &Key, _: LockOptions) -> Result<LockGuard> {
            self.answer().await?;
            let (notifier, lost) = crate::lock::lost_pair();
            std::mem::forget(notifier); // held "forever" by the fake's lease
            let release = FakeRelease {
                releases: self.releases.clone(),
                hang: self.hang_release,
            };
            Ok(LockGuard::new(key.clone(), 1, lost, Box::new(release)))
        }
        async fn try_lock(&self, key: &Key, opts: LockOptions) -> Result<Option<LockGuard>> {
            self.lock(key, opts).await.map(Some)
        }
    }

    const LOCK_CAPS: Capabilities = Capabilities::full(8).with_ttl(None);

    fn layered(fake: Arc<Fake>) -> Kv {
        let cfg = LayerConfig {
            timeout: Duration::from_secs(1),
            ..LayerConfig::default()
        };
        Kv::new(fake, cfg)
    }

    fn k() -> Key {
        Key::new("k").unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_applies_to_each_attempt_inside_retry() {
        let fake = Arc::new(Fake::default());
        fake.hang.store(2, Ordering::SeqCst);
        let kv = layered(fake.clone());
        let started = Instant::now();
        assert_eq!(kv.get(&k()).await.unwrap(), None, "third attempt succeeds");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
        // Two 1 s attempt timeouts plus 50 ms + 100 ms of backoff.
        assert_eq!(started.elapsed(), Duration::from_millis(2150));
        assert!(kv.liveness().is_alive());
    }

    #[tokio::test(start_paused = true)]
    async fn retries_give_up_with_the_last_error() {
        let fake = Arc::new(Fake::default());
        fake.fail.store(10, Ordering::SeqCst);
        let kv = layered(fake.clone());
        let e = kv.get(&k()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 3, "max_attempts");
        assert!(!kv.liveness().is_alive());
    }

    #[tokio::test(start_paused = true)]
    async fn non_idempotent_writes_are_not_retried() {
        let fake = Arc::new(Fake::default());
        fake.fail.store(10, Ordering::SeqCst);
        let kv = layered(fake.clone());
        let e = kv
            .put(&k(), "v".into(), PutOptions::if_absent())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            1,
            "a conditional put is tried once"
        );
        kv.delete(&k(), Condition::Always).await.unwrap_err();
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            2,
            "a delete is tried once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn probe_is_bounded_by_the_timeout() {
        let fake = Arc::new(Fake::default());
        fake.hang.store(1, Ordering::SeqCst);
        let kv = layered(fake.clone());
        let started = Instant::now();
        let e = kv.probe().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "probe is not retried"
        );
        assert!(!kv.liveness().is_alive());
        kv.probe().await.unwrap();
        assert!(kv.liveness().is_alive());
    }

    #[tokio::test(start_paused = true)]
    async fn background_prober_moves_liveness_without_traffic() {
        let fake = Arc::new(Fake::default());
        let cfg = LayerConfig {
            timeout: Duration::from_secs(1),
            probe_interval: Some(Duration::from_secs(5)),
            ..LayerConfig::default()
        };
        let kv = Kv::new(fake.clone(), cfg);
        let mut states = kv.liveness().subscribe();
        assert_eq!(states.next().await, Some(false));
        assert_eq!(
            states.next().await,
            Some(true),
            "first probe makes it alive"
        );
        fake.fail.store(1, Ordering::SeqCst);
        assert_eq!(
            states.next().await,
            Some(false),
            "a failed probe makes it not alive"
        );
        assert_eq!(
            states.next().await,
            Some(true),
            "and the next one alive again"
        );
        kv.close().await.unwrap();
        let calls = fake.calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            calls,
            "close stops the prober"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_arguments_never_reach_the_driver_nor_liveness() {
        let fake = Arc::new(Fake::default());
        let kv = layered(fake.clone());
        let ttl = PutOptions::default().with_ttl(Duration::from_secs(1));
        assert_eq!(
            kv.put(&k(), "v".into(), ttl).await.unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let big = Bytes::from(vec![0u8; 9]);
        assert_eq!(
            kv.put(&k(), big, PutOptions::default())
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::ValueTooLarge
        );
        let lock = kv.lock(&k(), LockOptions::default()).await.unwrap_err();
        assert_eq!(lock.kind(), ErrorKind::Unsupported);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
        let mut states = kv.liveness().subscribe();
        assert_eq!(states.next().await, Some(false), "liveness untouched");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_is_retried_only_when_it_never_reached_the_server() {
        let fake = Arc::new(Fake::default());
        fake.fail.store(1, Ordering::SeqCst);
        let kv = layered(fake.clone());
        let e = kv.put(&k(), "v".into(), PutOptions::default()).await;
        assert_eq!(e.unwrap_err().kind(), ErrorKind::Unavailable);
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            1,
            "an unconditional put that may have been applied is not retried"
        );
        fake.refuse.store(2, Ordering::SeqCst);
        kv.put(&k(), "v".into(), PutOptions::if_absent())
            .await
            .expect("refused twice, then applied");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 4);
    }

    fn lock_fake(hang_release: bool) -> Arc<Fake> {
        Arc::new(Fake {
            caps: Some(LOCK_CAPS),
            hang_release,
            ..Fake::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn release_ends_within_the_timeout_on_a_hung_backend() {
        let fake = lock_fake(true);
        let kv = layered(fake.clone());
        let guard = kv.lock(&k(), LockOptions::default()).await.unwrap();
        let lost = guard.lost();
        let started = Instant::now();
        let e = guard.release().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert_eq!(started.elapsed(), Duration::from_secs(1), "one timeout");
        assert_eq!(fake.releases.load(Ordering::SeqCst), 1);
        tokio::time::timeout(Duration::from_millis(1), lost)
            .await
            .expect("a released guard reports lost");
    }

    #[tokio::test(start_paused = true)]
    async fn close_releases_held_locks_and_refuses_operations() {
        let fake = lock_fake(false);
        let kv = layered(fake.clone());
        let guard = kv.lock(&k(), LockOptions::default()).await.unwrap();
        let kept = kv.try_lock(&k(), LockOptions::default()).await.unwrap();
        assert!(!guard.is_lost());
        kv.close().await.unwrap();
        assert_eq!(fake.releases.load(Ordering::SeqCst), 2, "both released");
        tokio::time::timeout(Duration::from_millis(1), guard.lost())
            .await
            .expect("close fires lost()");
        assert!(kept.expect("taken").is_lost());
        guard.release().await.expect("releasing again is a no-op");
        assert_eq!(fake.releases.load(Ordering::SeqCst), 2, "not twice");
        let calls = fake.calls.load(Ordering::SeqCst);
        for e in [
            kv.get(&k()).await.map(drop).unwrap_err(),
            kv.lock(&k(), LockOptions::default())
                .await
                .map(drop)
                .unwrap_err(),
            kv.watch(Target::Key(k()), Start::Now)
                .await
                .map(drop)
                .unwrap_err(),
        ] {
            assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), calls, "driver untouched");
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_reports_an_outage_within_two_timeouts_then_goes_on() {
        let fake = Arc::new(Fake::default());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *fake.watch_rx.lock().unwrap() = Some(rx);
        let kv = layered(fake.clone());
        let mut w = kv
            .watch(Target::Prefix(Prefix::root()), Start::Now)
            .await
            .unwrap();
        tx.send(delete_event("a")).unwrap();
        assert!(matches!(w.next().await, Some(Ok(Event::Delete { .. }))));
        // The backend freezes: every probe hangs from now on.
        fake.hang.store(u32::MAX, Ordering::SeqCst);
        let started = Instant::now();
        let e = w.next().await.expect("an item").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(
            started.elapsed() <= Duration::from_secs(2),
            "within 2 × timeout, took {:?}",
            started.elapsed()
        );
        // Once reported, no second item for the same outage; events go on.
        fake.hang.store(0, Ordering::SeqCst);
        tx.send(delete_event("b")).unwrap();
        assert!(matches!(w.next().await, Some(Ok(Event::Delete { .. }))));
        drop(w);
        let calls = fake.calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(
            fake.calls.load(Ordering::SeqCst) <= calls + 1,
            "the last watch dropped stops the probes"
        );
    }

    fn delete_event(k: &str) -> Result<Event> {
        Ok(Event::Delete {
            key: Key::new(k).unwrap(),
            revision: 7,
        })
    }

    #[tokio::test]
    async fn a_watch_never_ends_silently() {
        let fake = Arc::new(Fake::default());
        *fake.watch_items.lock().unwrap() = vec![delete_event("a")];
        let kv = layered(fake.clone());
        let mut w = kv
            .watch(Target::Prefix(Prefix::root()), Start::Now)
            .await
            .unwrap();
        assert!(matches!(w.next().await, Some(Ok(Event::Delete { .. }))));
        let end = w.next().await.expect("an error item, not a silent end");
        assert_eq!(end.unwrap_err().kind(), ErrorKind::Unavailable);
        assert!(w.next().await.is_none());
    }

    #[tokio::test]
    async fn a_watch_that_ends_after_its_error_ends_cleanly() {
        let fake = Arc::new(Fake::default());
        let compacted = Err(Error::Compacted {
            backend: "fake",
            revision: 1,
            oldest: 5,
        });
        *fake.watch_items.lock().unwrap() = vec![delete_event("a"), compacted];
        let kv = layered(fake.clone());
        let mut w = kv
            .watch(Target::Prefix(Prefix::root()), Start::After(1))
            .await
            .unwrap();
        assert!(matches!(w.next().await, Some(Ok(_))));
        assert_eq!(
            w.next().await.unwrap().unwrap_err().kind(),
            ErrorKind::Compacted
        );
        assert!(
            w.next().await.is_none(),
            "no extra error after the driver's own"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_liveness_subscriber_never_slows_operations() {
        let fake = Arc::new(Fake::default());
        let kv = layered(fake.clone());
        let _never_polled = kv.liveness().subscribe();
        let started = Instant::now();
        for _ in 0..1000 {
            kv.get(&k()).await.unwrap();
        }
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no operation waited on the subscriber"
        );
    }
}
