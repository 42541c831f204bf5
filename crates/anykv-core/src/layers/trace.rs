//! A `tracing` span per operation (`anykv` with backend, operation and
//! key), closed by a debug event with the outcome and the latency.

use async_trait::async_trait;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    error::Result,
    layer::{Layer, Next},
    layers::request::{Request, Response},
};

/// The standard tracing layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingLayer;

#[async_trait]
impl Layer for TracingLayer {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
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
