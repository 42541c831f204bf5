//! [`Context`]: the state of one handle (driver, layers, settings,
//! liveness, close state), the background prober and the watch watchdog.

use std::{
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::task::JoinHandle;

use crate::{
    capability::Capabilities,
    error::Error,
    held_locks::{HeldLocks, HeldSessions},
    layer::{Kv, Layer, LayerConfig, OpKind, Response},
    liveness::LivenessMonitor,
    store::Store,
};

/// The state of one [`Kv`] handle, shared by its clones and seen by layers
/// through [`Next::context`](crate::Next::context).
pub struct Context {
    me: Weak<Context>,
    pub(super) driver: Arc<dyn Store>,
    pub(super) layers: Arc<[Arc<dyn Layer>]>,
    pub(super) backend: &'static str,
    pub(super) caps: Capabilities,
    pub(super) cfg: LayerConfig,
    pub(super) liveness: Arc<LivenessMonitor>,
    pub(super) prober: Mutex<Option<JoinHandle<()>>>,
    /// Set by `close()`: refuses further operations; read by every
    /// operation without a lock.
    closed_now: AtomicBool,
    /// Woken by `close()`: ends this handle's streams (each waits on it
    /// with [`Context::closing`]).
    closing: Arc<tokio::sync::Notify>,
    /// Scoped views share the driver and must not close it.
    pub(super) owns_driver: bool,
    /// Locks taken through this handle, released by `close()`.
    pub(super) locks: Arc<HeldLocks>,
    /// Sessions started through this handle, ended by `close()`.
    pub(super) sessions: Arc<HeldSessions>,
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
    pub(super) fn new(
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
            closed_now: AtomicBool::new(false),
            closing: Arc::default(),
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
        self.closed_now.load(Ordering::Acquire)
    }

    /// Refuses further operations and ends the handle's streams.
    pub(super) fn mark_closed(&self) {
        self.closed_now.store(true, Ordering::Release);
        self.closing.notify_waiters();
    }

    /// Resolves once `close()` is called after this call; check
    /// [`is_closed`](Self::is_closed) after taking it for a close before.
    pub(super) fn closing(&self) -> tokio::sync::futures::OwnedNotified {
        self.closing.clone().notified_owned()
    }

    /// The handle, while it exists (for a layer's background work).
    pub fn handle(&self) -> Option<Kv> {
        self.me.upgrade().map(Kv::from_context)
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

    pub(super) fn set_prober(&self, every: Duration) {
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
                let _ = Kv::from_context(inner).probe().await;
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
    pub(super) fn closed_error(&self) -> Error {
        Error::Cancelled {
            backend: self.backend,
            message: "store handle closed".into(),
        }
    }

    /// A layer answered with the wrong response: a bug in that layer.
    pub(super) fn mismatch(&self, want: OpKind, got: &Response) -> Error {
        Error::Backend {
            backend: self.backend,
            message: format!("a layer answered {want} with a {} response", got.kind()),
            source: None,
        }
    }
}
