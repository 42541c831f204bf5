//! Metrics on the [`metrics`] facade, so that any exporter (Prometheus,
//! StatsD, OpenTelemetry) plugs in. Cargo feature `metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `anykv_operations_total` | counter | `backend`, `operation`, `outcome` (`ok` or the error kind, e.g. `unavailable`) |
//! | `anykv_operation_duration_seconds` | histogram | `backend`, `operation` |
//! | `anykv_alive` | gauge (1 alive, 0 not) | `backend` |
//! | `anykv_open_watches` | gauge | `backend` |
//! | `anykv_held_locks` | gauge | `backend` |
//! | `anykv_live_sessions` | gauge | `backend` (reserved: sessions do not exist yet) |
//! | `anykv_watch_events_total` | counter | `backend` |
//! | `anykv_watch_errors_total` | counter | `backend`, `kind` (outages reported on watches) |
//! | `anykv_watch_resumes_total` | counter | `backend` (events flowing again after an error item) |
//!
//! Added outermost ([`KvBuilder::layer`](crate::KvBuilder::layer)), it
//! counts each call once as the caller made it, checks and retries included
//! in its outcome and latency.
//!
//! ```
//! # fn demo(driver: std::sync::Arc<dyn anykv_core::Store>) {
//! use anykv_core::{Kv, layers::metrics::MetricsLayer};
//! let kv = Kv::builder_for(driver).layer(MetricsLayer).build();
//! # let _ = kv; }
//! ```

use async_trait::async_trait;
use futures::StreamExt;
use tokio::time::Instant;

use crate::{
    error::{ErrorKind, Result},
    layer::{Layer, Next},
    layers::request::{Request, Response},
    lock::{LockGuard, LockRelease},
    store::WatchStream,
};

/// Records operations, latency, liveness, open watches and held locks.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetricsLayer;

/// The `outcome` label of an error kind.
pub fn outcome_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::NotFound => "not_found",
        ErrorKind::AlreadyExists => "already_exists",
        ErrorKind::Conflict => "conflict",
        ErrorKind::InvalidKey => "invalid_key",
        ErrorKind::InvalidArgument => "invalid_argument",
        ErrorKind::ValueTooLarge => "value_too_large",
        ErrorKind::Unsupported => "unsupported",
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Compacted => "compacted",
        ErrorKind::LockLost => "lock_lost",
        ErrorKind::PermissionDenied => "permission_denied",
        ErrorKind::Unauthenticated => "unauthenticated",
        ErrorKind::DataLoss => "data_loss",
        ErrorKind::Cancelled => "cancelled",
        ErrorKind::UnknownBackend => "unknown_backend",
        ErrorKind::InvalidUrl => "invalid_url",
        ErrorKind::Codec => "codec",
        ErrorKind::Backend => "backend",
    }
}

#[async_trait]
impl Layer for MetricsLayer {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
        let ctx = next.context();
        let backend = ctx.backend();
        let operation = req.name();
        let started = Instant::now();
        let out = next.run(req).await;
        let outcome = match &out {
            Ok(_) => "ok",
            Err(e) => outcome_label(e.kind()),
        };
        metrics::counter!("anykv_operations_total", "backend" => backend, "operation" => operation, "outcome" => outcome)
            .increment(1);
        metrics::histogram!("anykv_operation_duration_seconds", "backend" => backend, "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        let alive = if ctx.liveness().is_alive() { 1.0 } else { 0.0 };
        metrics::gauge!("anykv_alive", "backend" => backend).set(alive);
        Ok(match out? {
            Response::Watch(s) => Response::Watch(count_watch(backend, s)),
            Response::Lock(g) => Response::Lock(count_lock(backend, g)),
            Response::TryLock(g) => Response::TryLock(g.map(|g| count_lock(backend, g))),
            other => other,
        })
    }
}

/// Decrements a gauge when dropped.
struct Held(metrics::Gauge);

impl Held {
    fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Held(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

fn count_watch(backend: &'static str, s: WatchStream) -> WatchStream {
    let open = Held::new(metrics::gauge!("anykv_open_watches", "backend" => backend));
    let events = metrics::counter!("anykv_watch_events_total", "backend" => backend);
    let resumes = metrics::counter!("anykv_watch_resumes_total", "backend" => backend);
    let mut after_error = false;
    s.inspect(move |item| {
        let _open = &open; // dropped with the stream
        match item {
            Ok(_) => {
                events.increment(1);
                if std::mem::take(&mut after_error) {
                    resumes.increment(1);
                }
            }
            Err(e) => {
                after_error = true;
                metrics::counter!("anykv_watch_errors_total", "backend" => backend, "kind" => outcome_label(e.kind()))
                    .increment(1);
            }
        }
    })
    .boxed()
}

/// A release that keeps `anykv_held_locks` up while the lock is held.
struct CountedRelease {
    inner: Box<dyn LockRelease>,
    _held: Held,
}

#[async_trait]
impl LockRelease for CountedRelease {
    async fn release(self: Box<Self>) -> Result<()> {
        let CountedRelease { inner, _held } = *self;
        inner.release().await
    }

    fn release_on_drop(self: Box<Self>) {
        let CountedRelease { inner, _held } = *self;
        inner.release_on_drop();
    }
}

fn count_lock(backend: &'static str, guard: LockGuard) -> LockGuard {
    let (key, token, lost, release) = guard.into_parts();
    match release {
        Some(inner) => {
            let held = Held::new(metrics::gauge!("anykv_held_locks", "backend" => backend));
            let release = CountedRelease { inner, _held: held };
            LockGuard::new(key, token, lost, Box::new(release))
        }
        None => {
            // Already released: nothing held, nothing to count.
            struct Done;
            #[async_trait]
            impl LockRelease for Done {
                async fn release(self: Box<Self>) -> Result<()> {
                    Ok(())
                }
            }
            LockGuard::new(key, token, lost, Box::new(Done))
        }
    }
}
