//! Fail fast while the backend is down (kvdb's quorum filter).
//!
//! While the handle's liveness is known not-alive, every operation but
//! `probe` and `close` fails at once with `Unavailable`, without reaching
//! the layers below: no waiting out timeouts and retries against a backend
//! known to be down. Liveness still unknown (nothing answered yet) lets
//! operations through. With [`FailFastLayer::with_probe`], the first refused
//! operation starts the handle's background prober, so that liveness (and
//! the layer) recovers without traffic; without it, recovery needs the
//! prober (`?probe_interval=`) or explicit `probe()` calls.
//!
//! ```
//! # fn demo(driver: std::sync::Arc<dyn anykv_core::Store>) {
//! use anykv_core::{Kv, layers::fail_fast::FailFastLayer};
//! let kv = Kv::builder_for(driver)
//!     .layer(FailFastLayer::new().with_probe(std::time::Duration::from_secs(1)))
//!     .build();
//! # let _ = kv; }
//! ```

use std::time::Duration;

use async_trait::async_trait;

use crate::{
    error::{Error, Result},
    layer::{Layer, Next},
    layers::request::{Request, Response},
};

/// Refuses operations at once while liveness is not-alive.
#[derive(Clone, Copy, Debug, Default)]
pub struct FailFastLayer {
    probe_every: Option<Duration>,
}

impl FailFastLayer {
    /// Fails fast; recovery is left to the handle's prober or `probe()`.
    pub fn new() -> Self {
        FailFastLayer::default()
    }

    /// Starts the handle's background prober (every `every`) when it first
    /// refuses an operation, unless a prober already runs.
    pub fn with_probe(mut self, every: Duration) -> Self {
        self.probe_every = Some(every);
        self
    }
}

#[async_trait]
impl Layer for FailFastLayer {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
        let ctx = next.context();
        let liveness = ctx.liveness();
        if liveness.is_alive()
            || !liveness.is_known()
            || matches!(req, Request::Probe | Request::Close)
        {
            return next.run(req).await;
        }
        if let Some(every) = self.probe_every {
            ctx.ensure_prober(every);
        }
        Err(Error::Unavailable {
            backend: ctx.backend(),
            message: format!("{} refused at once: the backend is not alive", req.name()),
            source: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorKind, Key, Kv, Store, layers::test_store::TestStore};

    #[tokio::test(start_paused = true)]
    async fn refuses_at_once_while_not_alive_without_reaching_the_driver() {
        let store = TestStore::new();
        let kv = Kv::builder_for(store.clone())
            .layer(FailFastLayer::new())
            .build();
        let key = Key::new("k").unwrap();
        kv.get(&key)
            .await
            .expect("unknown liveness lets calls through");
        kv.liveness().set(false);
        let calls = store.calls();
        let started = tokio::time::Instant::now();
        for _ in 0..1000 {
            let e = kv.get(&key).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unavailable);
        }
        // The clock is paused and auto-advances only when a task awaits a
        // timer: zero elapsed proves no timeout or backoff was waited out.
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(store.calls(), calls, "the driver is never called");
        kv.probe().await.expect("probes go through");
        assert!(kv.liveness().is_alive());
        kv.get(&key).await.expect("alive again: calls go through");
    }

    #[tokio::test(start_paused = true)]
    async fn the_optional_probe_recovers() {
        let store = TestStore::new();
        let kv = Kv::builder_for(store.clone())
            .layer(FailFastLayer::new().with_probe(Duration::from_secs(1)))
            .build();
        kv.liveness().set(false);
        let key = Key::new("k").unwrap();
        kv.get(&key).await.unwrap_err();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(kv.liveness().is_alive(), "the prober it started recovered");
        kv.get(&key).await.unwrap();
    }
}
