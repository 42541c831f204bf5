//! [`Kv`]: the handle applications use, and its [`Store`] impl (each call a
//! [`Request`] through the layers).

use std::{any::Any, future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::Either;

use crate::{
    capability::Capabilities,
    error::Result,
    key::{Key, Prefix},
    layer::{
        Context, ImportPairs, KvBuilder, Layer, LayerConfig, Next, OpKind, Request, Response,
        builder::Source, standard::StandardRun, stream_guard::guard_stream,
    },
    liveness::LivenessMonitor,
    lock::LockGuard,
    session::{Session, SessionOptions},
    store::{PairStream, Store, WatchStream},
    types::{
        Check, Condition, KvPair, LockInfo, LockOptions, Op, PutOptions, Revision, Snapshot, Start,
        Target, Version,
    },
};

/// A driver wrapped in layers: the handle applications use.
///
/// Cheap to clone; clones share the driver, the layers, the liveness
/// monitor and the background prober. `Kv` implements [`Store`] with keys
/// relative to its namespace: each call becomes a [`Request`] run through
/// the layers (see the [module docs](crate::layer)).
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
    pub(super) inner: Arc<Context>,
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
    pub(super) fn from_context(inner: Arc<Context>) -> Kv {
        Kv { inner }
    }

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
        self.inner.layers.iter().find_map(|l| {
            let l = &**l as &dyn Any;
            l.downcast_ref::<L>()
                .or_else(|| l.downcast_ref::<StandardRun>()?.find::<L>())
        })
    }

    /// A view of the same driver and layers scoped to a sub-namespace, with
    /// its own liveness monitor. Closing the view ends its watches but
    /// leaves the driver open for the other handles.
    pub fn scoped(&self, sub: &Prefix) -> Kv {
        let mut cfg = self.inner.cfg.clone();
        cfg.namespace = cfg.namespace.join_prefix(sub);
        cfg.probe_interval = None;
        Kv::from_context(Context::new(
            self.inner.driver.clone(),
            self.inner.layers.clone(),
            cfg,
            false,
        ))
    }

    /// Probes the backend every `every` in the background, so that liveness
    /// moves without traffic. Replaces a running prober.
    pub fn start_prober(&self, every: Duration) {
        self.inner.set_prober(every);
    }

    /// Runs one request through this handle's layers. A standard run on
    /// top (the default stack) is awaited inline: no box for it.
    fn run(&self, req: Request) -> impl Future<Output = Result<Response>> + Send + '_ {
        let ctx = &*self.inner;
        if ctx.is_closed() {
            return Either::Left(std::future::ready(Err(ctx.closed_error())));
        }
        if let Some((first, rest)) = ctx.layers.split_first()
            && let Some(run) = (&**first as &dyn Any).downcast_ref::<StandardRun>()
        {
            return Either::Right(Either::Left(run.run(req, Next { layers: rest, ctx })));
        }
        let next = Next {
            layers: &ctx.layers,
            ctx,
        };
        Either::Right(Either::Right(next.run_unboxed(req)))
    }

    /// Registers a guard with this handle (see [`HeldLocks`]).
    fn track(&self, guard: LockGuard, max_hold: Option<Duration>) -> LockGuard {
        self.inner
            .locks
            .track(guard, self.inner.backend, self.inner.cfg.timeout, max_hold)
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
        run!(self, Request::Watch { target, start }, Watch(s) => guard_stream(self, s, true))
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
        run!(self, req, Export(s) => guard_stream(self, s, false))
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
        self.inner.mark_closed();
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
