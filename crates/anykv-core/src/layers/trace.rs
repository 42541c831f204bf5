//! A `tracing` span per operation (`anykv` with backend, operation and
//! key), closed by a debug event with the outcome and the latency.

use async_trait::async_trait;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    error::Result,
    layer::{Inner, Layer, Next, Standard},
    layers::request::{Request, Response},
};

/// The standard tracing layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingLayer;

#[async_trait]
impl Layer for TracingLayer {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
        self.around(req, next).await
    }
}

impl Standard for TracingLayer {
    async fn around<N: Inner>(&self, req: Request, next: N) -> Result<Response> {
        if !interested() {
            return next.run(req).await;
        }
        let span = tracing::debug_span!(
            "anykv",
            backend = next.context().backend(),
            operation = req.name(),
            key = req.key().unwrap_or(""),
        );
        async move {
            let started = Instant::now();
            let outcome = next.run(req).await;
            let latency_us = started.elapsed().as_micros() as u64;
            match &outcome {
                Ok(_) => tracing::debug!(latency_us, outcome = "ok"),
                Err(e) => tracing::debug!(latency_us, outcome = ?e.kind(), error = %e),
            }
            outcome
        }
        .instrument(span)
        .await
    }
}

/// Whether a subscriber may record this layer's span or events: without
/// one (or with DEBUG filtered out everywhere) the layer costs nothing.
pub(crate) fn interested() -> bool {
    tracing::level_enabled!(tracing::Level::DEBUG)
}
