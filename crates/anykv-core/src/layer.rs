//! Layers and their composition: what [`Kv`] is made of.
//!
//! [`Kv`] turns every [`Store`] call into a [`Request`], runs it through a
//! stack of [`Layer`]s and unpacks the [`Response`]. The standard stack,
//! outermost first (see `docs/contract.md`):
//!
//! namespace → capability checks → tracing span → liveness → retry →
//! per-attempt timeout → driver
//!
//! Each standard layer lives in its own module under [`layers`](mod@crate::layers).
//! The handle itself keeps what no layer may drop: `close()` (later
//! operations fail with `Cancelled`, watches end with it, held locks are
//! released, each bounded by the timeout) and "a watch never ends silently".
//!
//! ```
//! use anykv_core::{async_trait, Kv, Layer, Next, Request, Response, Result, StandardLayer};
//! # use std::sync::Arc;
//!
//! /// Logs the name of every operation.
//! struct Log;
//!
//! #[async_trait]
//! impl Layer for Log {
//!     async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
//!         let name = req.name();
//!         let out = next.run(req).await;
//!         println!("{name}: {}", if out.is_ok() { "ok" } else { "error" });
//!         out
//!     }
//! }
//!
//! # fn demo(driver: Arc<dyn anykv_core::Store>) {
//! let kv: Kv = Kv::builder_for(driver)
//!     .layer(Log)                        // outermost: sees the caller's keys
//!     .without(StandardLayer::Retry)     // drop a standard layer
//!     .build();
//! # }
//! ```

use std::{
    any::Any,
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, future::BoxFuture, stream::BoxStream};
use tokio::task::JoinHandle;

use crate::{
    capability::Capabilities,
    error::{Error, Result},
    held_locks::{HeldLocks, HeldSessions},
    key::{Key, Prefix},
    layers,
    liveness::{DEFAULT_LIVENESS_INTERVAL, LivenessMonitor},
    lock::LockGuard,
    session::{Session, SessionOptions},
    store::{PairStream, Store, WatchStream},
    types::{
        Check, Condition, KvPair, LockInfo, LockOptions, Op, PutOptions, Revision, Snapshot, Start,
        Target, Version,
    },
};

pub use crate::layers::request::{ImportPairs, OpKind, Request, Response};
pub use crate::layers::retry::RetryPolicy;

/// An interceptor around every operation of a [`Kv`].
///
/// `call` receives each operation as a [`Request`] and passes it on with
/// [`Next::run`] (or answers it itself); it sees every operation, watch,
/// lock and close included, through this one method. To treat some
/// operations apart, match on [`Request::kind`]. Watch and export responses
/// carry their stream, lock responses their guard: a layer may wrap them.
/// [`Next::context`] gives the handle's backend, settings and liveness.
#[async_trait]
pub trait Layer: Any + Send + Sync {
    /// Handles one operation.
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response>;
}

/// The rest of the stack below a layer: pass a request on with [`Next::run`].
///
/// `Copy`, so a layer may run several requests (the retry layer repeats one).
#[derive(Clone, Copy)]
pub struct Next<'a> {
    layers: &'a [Arc<dyn Layer>],
    ctx: &'a Context,
}

impl<'a> Next<'a> {
    /// Runs `req` through the layers below, then the driver.
    ///
    /// Returns the next layer's boxed future as is (no wrapper future per
    /// layer: each layer's own future stays small).
    pub fn run(self, req: Request) -> BoxFuture<'a, Result<Response>> {
        match self.layers.split_first() {
            Some((layer, rest)) => {
                let next = Next {
                    layers: rest,
                    ctx: self.ctx,
                };
                layer.call(req, next)
            }
            // A scoped view shares the driver and must not close it.
            None if matches!(req, Request::Close) && !self.ctx.owns_driver => {
                Box::pin(std::future::ready(Ok(Response::Close)))
            }
            None => Box::pin(req.run_on(&*self.ctx.driver)),
        }
    }

    /// The handle this request runs for.
    pub fn context(&self) -> &'a Context {
        self.ctx
    }
}

/// The standard layers, for [`KvBuilder::without`] and [`KvBuilder::replace`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StandardLayer {
    /// Keys relative to the namespace; hides the reserved root.
    Namespace,
    /// Capability and argument checks before any I/O.
    Checks,
    /// A `tracing` span per operation, with outcome and latency.
    Tracing,
    /// Feeds the liveness monitor; reports outages on open watches.
    Liveness,
    /// Retries idempotent operations (and writes that never reached the server).
    Retry,
    /// Bounds each attempt by the timeout.
    Timeout,
}

impl StandardLayer {
    /// The standard stack, outermost first.
    pub const ORDER: [StandardLayer; 6] = [
        StandardLayer::Namespace,
        StandardLayer::Checks,
        StandardLayer::Tracing,
        StandardLayer::Liveness,
        StandardLayer::Retry,
        StandardLayer::Timeout,
    ];

    fn build(self) -> Arc<dyn Layer> {
        match self {
            StandardLayer::Namespace => Arc::new(layers::namespace::NamespaceLayer),
            StandardLayer::Checks => Arc::new(layers::checks::ChecksLayer),
            StandardLayer::Tracing => Arc::new(layers::trace::TracingLayer),
            StandardLayer::Liveness => Arc::new(layers::liveness::LivenessLayer),
            StandardLayer::Retry => Arc::new(layers::retry::RetryLayer),
            StandardLayer::Timeout => Arc::new(layers::timeout::TimeoutLayer),
        }
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
    /// Fault injection below the standard layers (`?chaos=…`, see
    /// [`ChaosConfig`](crate::layers::chaos::ChaosConfig)); off by default.
    pub chaos: Option<layers::chaos::ChaosConfig>,
}

impl Default for LayerConfig {
    fn default() -> Self {
        LayerConfig {
            namespace: Prefix::root(),
            timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            liveness_interval: DEFAULT_LIVENESS_INTERVAL,
            probe_interval: None,
            chaos: None,
        }
    }
}

/// Builds a [`Kv`]: the standard layers, minus those dropped, plus yours.
///
/// Made by [`builder`](crate::builder) (from a URL) or [`Kv::builder_for`]
/// (around any [`Store`], a third-party driver included).
///
/// ```
/// # async fn demo() -> anykv_core::Result<()> {
/// use anykv_core::{RetryPolicy, StandardLayer, layers::chaos::ChaosLayer};
/// let chaos = ChaosLayer::new(7);
/// let switch = chaos.handle();
/// # let _ = (chaos, switch);
/// // With a driver linked (the `anykv` facade links memory and redb):
/// // let kv = anykv::builder("memory://t")
/// //     .layer_below(chaos)                       // faults below retry and liveness
/// //     .retry(RetryPolicy { max_attempts: 5, ..Default::default() })
/// //     .without(StandardLayer::Tracing)
/// //     .open().await?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct KvBuilder {
    source: Source,
    cfg: Option<LayerConfig>,
    timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    outer: Vec<Arc<dyn Layer>>,
    below: Vec<Arc<dyn Layer>>,
    replaced: HashMap<StandardLayer, Option<Arc<dyn Layer>>>,
}

enum Source {
    Url(String),
    Store(Arc<dyn Store>),
}

impl KvBuilder {
    pub(crate) fn from_url(url: &str) -> Self {
        KvBuilder::with_source(Source::Url(url.to_owned()))
    }

    fn with_source(source: Source) -> Self {
        KvBuilder {
            source,
            cfg: None,
            timeout: None,
            retry: None,
            outer: Vec::new(),
            below: Vec::new(),
            replaced: HashMap::new(),
        }
    }

    /// Adds a layer outside the standard ones: it sees each call as the
    /// caller made it (keys relative to the namespace, one `delete_prefix`),
    /// once, whatever the retries. The first added is the outermost.
    pub fn layer(mut self, layer: impl Layer) -> Self {
        self.outer.push(Arc::new(layer));
        self
    }

    /// Adds a layer between the standard ones and the driver: it sees each
    /// attempt with full keys, and what it answers is seen by timeout, retry
    /// and liveness as the driver's answer (the place for fault injection).
    /// The first added is the outermost of these.
    pub fn layer_below(mut self, layer: impl Layer) -> Self {
        self.below.push(Arc::new(layer));
        self
    }

    /// Drops a standard layer.
    pub fn without(mut self, standard: StandardLayer) -> Self {
        self.replaced.insert(standard, None);
        self
    }

    /// Puts `layer` in the place of a standard one.
    pub fn replace(mut self, standard: StandardLayer, layer: impl Layer) -> Self {
        self.replaced.insert(standard, Some(Arc::new(layer)));
        self
    }

    /// Sets the retry policy (over the URL's `?retries=`).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Sets the per-attempt timeout (over the URL's `?timeout=`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Replaces every layer setting (a URL's options are then ignored).
    pub fn config(mut self, cfg: LayerConfig) -> Self {
        self.cfg = Some(cfg);
        self
    }

    /// Connects (for a URL) and builds the handle.
    pub async fn open(self) -> Result<Kv> {
        match &self.source {
            Source::Store(driver) => {
                let driver = driver.clone();
                let cfg = self.cfg.clone().unwrap_or_default();
                Ok(self.assemble(driver, cfg))
            }
            Source::Url(url) => {
                let (driver, config, url_cfg) = crate::registry::prepare(url)?;
                let store = (driver.open)(config).await?;
                let cfg = self.cfg.clone().unwrap_or(url_cfg);
                Ok(self.assemble(store, cfg))
            }
        }
    }

    /// Builds the handle around the driver given to [`Kv::builder_for`]
    /// (a URL builder needs [`open`](Self::open): this fails with
    /// `InvalidArgument`). Starts the prober if `probe_interval` is set.
    pub fn build(self) -> Kv {
        match &self.source {
            Source::Store(driver) => {
                let driver = driver.clone();
                let cfg = self.cfg.clone().unwrap_or_default();
                self.assemble(driver, cfg)
            }
            Source::Url(url) => {
                // No driver without connecting: a store that refuses everything.
                let store = Arc::new(layers::unopened::Unopened(url.clone()));
                let cfg = self.cfg.clone().unwrap_or_default();
                self.assemble(store, cfg)
            }
        }
    }

    fn assemble(self, driver: Arc<dyn Store>, mut cfg: LayerConfig) -> Kv {
        if let Some(t) = self.timeout {
            cfg.timeout = t;
        }
        if let Some(r) = self.retry {
            cfg.retry = r;
        }
        let mut stack = self.outer;
        for standard in StandardLayer::ORDER {
            match self.replaced.get(&standard) {
                None => stack.push(standard.build()),
                Some(Some(layer)) => stack.push(layer.clone()),
                Some(None) => {}
            }
        }
        stack.extend(self.below);
        if let Some(chaos) = &cfg.chaos {
            stack.push(Arc::new(layers::chaos::ChaosLayer::from_config(chaos)));
        }
        let kv = Kv {
            inner: Context::new(driver, stack.into(), cfg, true),
        };
        if let Some(every) = kv.inner.cfg.probe_interval {
            kv.start_prober(every);
        }
        kv
    }
}

/// The state of one [`Kv`] handle, shared by its clones and seen by layers
/// through [`Next::context`].
pub struct Context {
    me: Weak<Context>,
    driver: Arc<dyn Store>,
    layers: Arc<[Arc<dyn Layer>]>,
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
    /// Sessions started through this handle, ended by `close()`.
    sessions: Arc<HeldSessions>,
    /// Probes the backend while watches are open (see [`Context::watchdog_enter`]).
    watchdog: Mutex<Watchdog>,
}

/// Open watch streams of one handle and the probe task they keep running.
#[derive(Default)]
struct Watchdog {
    open: usize,
    task: Option<JoinHandle<()>>,
}

/// Held by an open watch stream; the last one dropped stops the probe task.
pub(crate) struct WatchTicket {
    ctx: Weak<Context>,
}

impl Drop for WatchTicket {
    fn drop(&mut self) {
        let Some(ctx) = self.ctx.upgrade() else {
            return;
        };
        let mut w = ctx.watchdog.lock().unwrap_or_else(|p| p.into_inner());
        w.open = w.open.saturating_sub(1);
        if w.open == 0
            && let Some(task) = w.task.take()
        {
            task.abort();
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if let Some(h) = self.prober.get_mut().ok().and_then(Option::take) {
            h.abort();
        }
        if let Some(h) = self.watchdog.get_mut().ok().and_then(|w| w.task.take()) {
            h.abort();
        }
    }
}

impl Context {
    fn new(
        driver: Arc<dyn Store>,
        layers: Arc<[Arc<dyn Layer>]>,
        cfg: LayerConfig,
        owns_driver: bool,
    ) -> Arc<Context> {
        Arc::new_cyclic(|me| Context {
            me: me.clone(),
            backend: driver.backend(),
            caps: driver.capabilities().clone(),
            liveness: Arc::new(LivenessMonitor::new(cfg.liveness_interval)),
            driver,
            layers,
            cfg,
            prober: Mutex::new(None),
            closed: tokio::sync::watch::Sender::new(false),
            owns_driver,
            locks: Arc::default(),
            sessions: Arc::default(),
            watchdog: Mutex::default(),
        })
    }

    /// The driver's backend name.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The driver's capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The layer settings (namespace, timeout, retry policy…).
    pub fn config(&self) -> &LayerConfig {
        &self.cfg
    }

    /// The handle's liveness monitor.
    pub fn liveness(&self) -> &Arc<LivenessMonitor> {
        &self.liveness
    }

    /// True once the handle is closed.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// The handle, while it exists (for a layer's background work).
    pub fn handle(&self) -> Option<Kv> {
        self.me.upgrade().map(|inner| Kv { inner })
    }

    /// Starts the background prober unless one runs (the fail-fast layer's
    /// recovery).
    pub fn ensure_prober(&self, every: Duration) {
        let running = self
            .prober
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|h| !h.is_finished());
        if !running && !self.is_closed() {
            self.set_prober(every);
        }
    }

    fn set_prober(&self, every: Duration) {
        let Some(task) = self.spawn_probe_loop(Duration::ZERO, every) else {
            tracing::warn!("no tokio runtime: background liveness prober not started");
            return;
        };
        let mut slot = self.prober.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.replace(task) {
            old.abort();
        }
    }

    /// A task probing the backend (through the whole stack) after `first`,
    /// then every `every`, until the handle is gone (`None` without a tokio
    /// runtime). Used by the background prober and the watchdog.
    fn spawn_probe_loop(&self, first: Duration, every: Duration) -> Option<JoinHandle<()>> {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let weak = self.me.clone();
        Some(rt.spawn(async move {
            let start = tokio::time::Instant::now() + first;
            let mut tick = tokio::time::interval_at(start, every);
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
    pub(crate) fn watchdog_enter(&self) -> WatchTicket {
        let mut w = self.watchdog.lock().unwrap_or_else(|p| p.into_inner());
        w.open += 1;
        if w.task.is_none() {
            // The watch just opened, so the backend answered a moment ago:
            // the first probe waits a period (and a watch dropped at once
            // costs no probe).
            w.task = self.spawn_probe_loop(self.cfg.timeout, self.cfg.timeout);
        }
        WatchTicket {
            ctx: self.me.clone(),
        }
    }

    /// What an operation or a watch of a closed handle gets.
    fn closed_error(&self) -> Error {
        Error::Cancelled {
            backend: self.backend,
            message: "store handle closed".into(),
        }
    }

    /// A layer answered with the wrong response: a bug in that layer.
    fn mismatch(&self, want: OpKind, got: &Response) -> Error {
        Error::Backend {
            backend: self.backend,
            message: format!("a layer answered {want} with a {} response", got.kind()),
            source: None,
        }
    }
}

/// A driver wrapped in layers: the handle applications use.
///
/// Cheap to clone; clones share the driver, the layers, the liveness
/// monitor and the background prober. `Kv` implements [`Store`] with keys
/// relative to its namespace: each call becomes a [`Request`] run through
/// the layers (see the [module docs](self)).
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
    inner: Arc<Context>,
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv")
            .field("backend", &self.inner.backend)
            .field("namespace", &self.inner.cfg.namespace)
            .field("alive", &self.inner.liveness.is_alive())
            .field("layers", &self.inner.layers.len())
            .finish()
    }
}

/// Runs a request and unpacks its response variant.
macro_rules! run {
    ($kv:expr, $req:expr, $resp:ident $( ( $v:ident ) )? => $out:expr) => {{
        let kind = OpKind::$resp;
        match $kv.run($req).await? {
            Response::$resp $( ( $v ) )? => Ok($out),
            other => Err($kv.inner.mismatch(kind, &other)),
        }
    }};
}

impl Kv {
    /// Wraps `driver` in the standard layers. Starts the background prober if
    /// `cfg.probe_interval` is set (needs a tokio runtime).
    pub fn new(driver: Arc<dyn Store>, cfg: LayerConfig) -> Kv {
        Kv::builder_for(driver).config(cfg).build()
    }

    /// A builder around any [`Store`] (a third-party driver included), to
    /// add, drop or replace layers. [`KvBuilder::build`] makes the handle.
    pub fn builder_for(driver: Arc<dyn Store>) -> KvBuilder {
        KvBuilder::with_source(Source::Store(driver))
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

    /// The first layer of type `L` in this handle's stack, e.g. a
    /// [`ChaosLayer`](crate::layers::chaos::ChaosLayer) set by URL.
    pub fn layer<L: Layer>(&self) -> Option<&L> {
        self.inner
            .layers
            .iter()
            .find_map(|l| (&**l as &dyn Any).downcast_ref::<L>())
    }

    /// A view of the same driver and layers scoped to a sub-namespace, with
    /// its own liveness monitor. Closing the view ends its watches but
    /// leaves the driver open for the other handles.
    pub fn scoped(&self, sub: &Prefix) -> Kv {
        let mut cfg = self.inner.cfg.clone();
        cfg.namespace = cfg.namespace.join_prefix(sub);
        cfg.probe_interval = None;
        Kv {
            inner: Context::new(
                self.inner.driver.clone(),
                self.inner.layers.clone(),
                cfg,
                false,
            ),
        }
    }

    /// Probes the backend every `every` in the background, so that liveness
    /// moves without traffic. Replaces a running prober.
    pub fn start_prober(&self, every: Duration) {
        self.inner.set_prober(every);
    }

    /// Runs one request through this handle's layers.
    async fn run(&self, req: Request) -> Result<Response> {
        if self.inner.is_closed() {
            return Err(self.inner.closed_error());
        }
        let next = Next {
            layers: &self.inner.layers,
            ctx: &self.inner,
        };
        next.run(req).await
    }

    /// Registers a guard with this handle (see [`HeldLocks`]).
    fn track(&self, guard: LockGuard, max_hold: Option<Duration>) -> LockGuard {
        self.inner
            .locks
            .track(guard, self.inner.backend, self.inner.cfg.timeout, max_hold)
    }

    /// Ends a stream with `Err(Cancelled)` when this handle is closed, and
    /// turns a watch (`endless`) that ends on its own (which the contract
    /// forbids) into a final `Err(Unavailable)`; a stream that ends right
    /// after an error item ends cleanly.
    fn guard_stream<T: Send + 'static>(
        &self,
        stream: BoxStream<'static, Result<T>>,
        endless: bool,
    ) -> BoxStream<'static, Result<T>> {
        struct St<T> {
            kv: Kv,
            inner: BoxStream<'static, Result<T>>,
            closed: tokio::sync::watch::Receiver<bool>,
            done: bool,
            after_error: bool,
        }
        let st = St {
            closed: self.inner.closed.subscribe(),
            kv: self.clone(),
            inner: stream,
            done: false,
            after_error: false,
        };
        futures::stream::unfold(st, move |mut st| async move {
            if st.done {
                return None;
            }
            let item = tokio::select! {
                biased;
                _ = st.closed.wait_for(|c| *c) => None,
                item = st.inner.next() => Some(item),
            };
            let Some(item) = item else {
                st.done = true;
                let e = st.kv.inner.closed_error();
                return Some((Err(e), st));
            };
            match item {
                Some(Ok(v)) => {
                    st.after_error = false;
                    Some((Ok(v), st))
                }
                Some(Err(e)) => {
                    st.after_error = true;
                    Some((Err(e), st))
                }
                None if endless && !st.after_error => {
                    st.done = true;
                    let e = Error::Unavailable {
                        backend: st.kv.inner.backend,
                        message: "watch stream ended unexpectedly".into(),
                        source: None,
                    };
                    Some((Err(e), st))
                }
                None => None,
            }
        })
        .boxed()
    }
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
        run!(self, Request::Get { key: key.clone() }, Get(v) => v)
    }

    async fn put(&self, key: &Key, value: Bytes, opts: PutOptions) -> Result<Version> {
        let req = Request::Put {
            key: key.clone(),
            value,
            opts,
        };
        run!(self, req, Put(v) => v)
    }

    async fn delete(&self, key: &Key, condition: Condition) -> Result<bool> {
        let req = Request::Delete {
            key: key.clone(),
            condition,
        };
        run!(self, req, Delete(v) => v)
    }

    async fn exists(&self, key: &Key) -> Result<bool> {
        run!(self, Request::Exists { key: key.clone() }, Exists(v) => v)
    }

    async fn list(&self, prefix: &Prefix) -> Result<Vec<KvPair>> {
        let req = Request::List {
            prefix: prefix.clone(),
        };
        run!(self, req, List(v) => v)
    }

    async fn keys(&self, prefix: &Prefix) -> Result<Vec<String>> {
        let req = Request::Keys {
            prefix: prefix.clone(),
        };
        run!(self, req, Keys(v) => v)
    }

    async fn delete_prefix(&self, prefix: &Prefix) -> Result<u64> {
        let req = Request::DeletePrefix {
            prefix: prefix.clone(),
        };
        run!(self, req, DeletePrefix(v) => v)
    }

    async fn watch(&self, target: Target, start: Start) -> Result<WatchStream> {
        run!(self, Request::Watch { target, start }, Watch(s) => self.guard_stream(s, true))
    }

    async fn lock(&self, key: &Key, opts: LockOptions) -> Result<LockGuard> {
        let max_hold = opts.max_hold;
        let req = Request::Lock {
            key: key.clone(),
            opts,
        };
        run!(self, req, Lock(g) => self.track(g, max_hold))
    }

    async fn try_lock(&self, key: &Key, opts: LockOptions) -> Result<Option<LockGuard>> {
        let max_hold = opts.max_hold;
        let req = Request::TryLock {
            key: key.clone(),
            opts,
        };
        run!(self, req, TryLock(g) => g.map(|g| self.track(g, max_hold)))
    }

    async fn lock_holder(&self, key: &Key) -> Result<Option<LockInfo>> {
        run!(self, Request::LockHolder { key: key.clone() }, LockHolder(v) => v)
    }

    async fn session(&self, opts: SessionOptions) -> Result<Session> {
        run!(self, Request::Session { opts }, Session(s) => self.inner.sessions.track(s))
    }

    async fn atomic(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<Revision> {
        run!(self, Request::Atomic { checks, ops }, Atomic(v) => v)
    }

    async fn snapshot(&self, prefixes: &[Prefix]) -> Result<Snapshot> {
        let req = Request::Snapshot {
            prefixes: prefixes.to_vec(),
        };
        run!(self, req, Snapshot(v) => v)
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        run!(self, Request::Compact { revision }, Compact => ())
    }

    async fn export(&self, prefix: &Prefix) -> Result<PairStream> {
        let req = Request::Export {
            prefix: prefix.clone(),
        };
        run!(self, req, Export(s) => self.guard_stream(s, false))
    }

    async fn import(&self, pairs: PairStream) -> Result<u64> {
        let req = Request::Import {
            pairs: ImportPairs::new(pairs),
        };
        run!(self, req, Import(v) => v)
    }

    async fn probe(&self) -> Result<()> {
        run!(self, Request::Probe, Probe => ())
    }

    /// Ends this handle's watch streams (each yields `Err(Cancelled)`),
    /// releases every lock taken through it (each guard's `lost()` fires),
    /// ends every session started through it (their ephemeral keys go),
    /// stops the prober, then runs `Close` through the layers; the driver is
    /// closed unless this is a [`scoped`](Kv::scoped) view. Every later
    /// operation fails with `Cancelled`.
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
        let ended = self
            .inner
            .sessions
            .close_all(self.inner.backend, self.inner.cfg.timeout)
            .await;
        let released = released.and(ended);
        let next = Next {
            layers: &self.inner.layers,
            ctx: &self.inner,
        };
        let closed = next.run(Request::Close).await.map(drop);
        released.and(closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::time::Instant;

    use crate::types::Event;

    use crate::ErrorKind;

    use futures::StreamExt;

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

#[cfg(test)]
mod bench {
    use super::*;
    use crate::layers::{chaos::ChaosLayer, fail_fast::FailFastLayer};

    /// A pass-through user layer: the cost of one extra layer.
    struct Noop;

    #[async_trait]
    impl Layer for Noop {
        async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
            next.run(req).await
        }
    }

    /// ns/op of get and put on the layers' test store, raw and through
    /// several stacks. `cargo test -p anykv-core --release --all-features
    /// --lib stack_overhead -- --ignored --nocapture`
    #[tokio::test(flavor = "current_thread")]
    #[ignore = "timing; run with --release --ignored --nocapture"]
    async fn stack_overhead() {
        let raw: Arc<dyn Store> = crate::layers::test_store::TestStore::new();
        let key = Key::new("a/b").unwrap();
        raw.put(&key, "v".into(), Default::default()).await.unwrap();
        let mut stacks: Vec<(&str, Arc<dyn Store>)> = vec![
            ("raw driver", raw.clone()),
            (
                "default stack",
                Arc::new(Kv::new(raw.clone(), LayerConfig::default())),
            ),
            ("no standard layers", {
                let mut b = Kv::builder_for(raw.clone());
                for s in StandardLayer::ORDER {
                    b = b.without(s);
                }
                Arc::new(b.build())
            }),
            (
                "default + noop layer",
                Arc::new(Kv::builder_for(raw.clone()).layer(Noop).build()),
            ),
            (
                "default + chaos (no faults)",
                Arc::new(
                    Kv::builder_for(raw.clone())
                        .layer_below(ChaosLayer::new(1))
                        .build(),
                ),
            ),
            (
                "default + fail-fast",
                Arc::new(
                    Kv::builder_for(raw.clone())
                        .layer(FailFastLayer::new())
                        .build(),
                ),
            ),
        ];
        #[cfg(feature = "metrics")]
        stacks.push((
            "default + metrics (no recorder)",
            Arc::new(
                Kv::builder_for(raw.clone())
                    .layer(crate::layers::metrics::MetricsLayer)
                    .build(),
            ),
        ));
        const N: u32 = 500_000;
        for round in 0..2 {
            for (name, s) in &mut stacks {
                let t = std::time::Instant::now();
                for _ in 0..N {
                    std::hint::black_box(s.get(&key).await.unwrap());
                }
                let get = t.elapsed().as_nanos() as f64 / f64::from(N);
                let t = std::time::Instant::now();
                for _ in 0..N {
                    let v = Bytes::from_static(b"v");
                    std::hint::black_box(s.put(&key, v, Default::default()).await.unwrap());
                }
                let put = t.elapsed().as_nanos() as f64 / f64::from(N);
                if round == 1 {
                    println!("BENCH {name:32} get {get:6.0} ns/op   put {put:6.0} ns/op");
                }
            }
        }
    }
}
