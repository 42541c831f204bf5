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
//! | `anykv_live_sessions` | gauge | `backend` |
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

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use crate::{
    error::{ErrorKind, Result},
    key::Key,
    layer::{Layer, Next},
    layers::request::{Request, Response},
    lock::{LockGuard, LockRelease},
    session::SessionBackend,
    store::WatchStream,
    types::{Condition, Version},
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
            Response::Session(s) => Response::Session(s.map_backend(|inner| {
                let live = Held::new(metrics::gauge!("anykv_live_sessions", "backend" => backend));
                Arc::new(CountedSession { inner, _live: live })
            })),
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

/// A session backend that keeps `anykv_live_sessions` up while it exists
/// (the session drops it once closed or dropped).
struct CountedSession {
    inner: Arc<dyn SessionBackend>,
    _live: Held,
}

#[async_trait]
impl SessionBackend for CountedSession {
    fn id(&self) -> String {
        self.inner.id()
    }

    async fn put(&self, key: &Key, value: Bytes, condition: Condition) -> Result<Version> {
        self.inner.put(key, value, condition).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use futures::StreamExt;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;
    use crate::{
        Condition, Key, Kv, LockOptions, Prefix, Start, Store, Target,
        layers::test_store::TestStore,
    };

    /// name{label=value,…} → value, sorted labels.
    fn snapshot(rec: &DebuggingRecorder) -> HashMap<String, DebugValue> {
        rec.snapshotter()
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(k, _, _, v)| {
                let key = k.key();
                let mut labels: Vec<String> = key
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                labels.sort();
                (format!("{}{{{}}}", key.name(), labels.join(",")), v)
            })
            .collect()
    }

    #[test]
    fn counters_match_the_operations_run() {
        let rec = DebuggingRecorder::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (during, after) = metrics::with_local_recorder(&rec, || {
            rt.block_on(async {
                let store = TestStore::new();
                let kv = Kv::builder_for(store.clone()).layer(MetricsLayer).build();
                let key = Key::new("k").unwrap();
                for _ in 0..3 {
                    kv.get(&key).await.unwrap();
                }
                kv.put(&key, "v".into(), Default::default()).await.unwrap();
                kv.put(&key, "v".into(), Default::default()).await.unwrap();
                kv.delete(&key, Condition::IfAbsent).await.unwrap_err();
                let mut w = kv
                    .watch(Target::Prefix(Prefix::root()), Start::Now)
                    .await
                    .unwrap();
                let tx = store.events.lock().unwrap()[0].clone();
                for r in 1..=2 {
                    tx.send(Ok(crate::Event::Delete {
                        key: key.clone(),
                        revision: r,
                    }))
                    .unwrap();
                    w.next().await.unwrap().unwrap();
                }
                let guard = kv.lock(&key, LockOptions::default()).await.unwrap();
                let during = snapshot(&rec);
                guard.release().await.unwrap();
                drop(w);
                (during, snapshot(&rec))
            })
        });
        // A snapshot drains every value (counters and gauges back to 0,
        // histograms emptied): the totals are both snapshots added up.
        let mut after = after;
        for (k, v) in &during {
            match (v, after.get_mut(k)) {
                (DebugValue::Counter(n), Some(DebugValue::Counter(m))) => *m += n,
                (DebugValue::Gauge(n), Some(DebugValue::Gauge(m))) => *m += *n,
                (DebugValue::Histogram(n), Some(DebugValue::Histogram(m))) => m.extend(n),
                _ => {}
            }
        }
        let ops = |op: &str, outcome: &str| {
            after.get(&format!(
                "anykv_operations_total{{backend=test,operation={op},outcome={outcome}}}"
            ))
        };
        assert_eq!(ops("get", "ok"), Some(&DebugValue::Counter(3)));
        assert_eq!(ops("put", "ok"), Some(&DebugValue::Counter(2)));
        assert_eq!(
            ops("delete", "invalid_argument"),
            Some(&DebugValue::Counter(1))
        );
        assert_eq!(ops("watch", "ok"), Some(&DebugValue::Counter(1)));
        assert_eq!(ops("lock", "ok"), Some(&DebugValue::Counter(1)));
        assert_eq!(ops("get", "unavailable"), None);
        match after.get("anykv_operation_duration_seconds{backend=test,operation=get}") {
            Some(DebugValue::Histogram(v)) => assert_eq!(v.len(), 3),
            other => panic!("get latency: {other:?}"),
        }
        let gauge = |m: &HashMap<String, DebugValue>, name: &str| match m
            .get(&format!("{name}{{backend=test}}"))
        {
            Some(DebugValue::Gauge(v)) => v.into_inner(),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(gauge(&during, "anykv_alive"), 1.0);
        assert_eq!(gauge(&during, "anykv_open_watches"), 1.0);
        assert_eq!(gauge(&during, "anykv_held_locks"), 1.0);
        assert_eq!(gauge(&after, "anykv_open_watches"), 0.0);
        assert_eq!(gauge(&after, "anykv_held_locks"), 0.0);
        assert_eq!(
            after.get("anykv_watch_events_total{backend=test}"),
            Some(&DebugValue::Counter(2))
        );
    }
}
