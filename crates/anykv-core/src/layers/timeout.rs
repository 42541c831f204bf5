//! The per-attempt deadline.
//!
//! Every attempt of an operation is bounded by the handle's timeout (the
//! retry layer above repeats attempts, so the bound is per attempt, not per
//! call). `lock` with `wait: Some(d)` is bounded by `d` plus one timeout for
//! the final round trip and fails with `Timeout { after: d }`; `lock`
//! without a wait and `close` are not bounded.

use async_trait::async_trait;

use crate::{
    error::{Error, Result},
    layer::{Layer, Next},
    layers::request::{Request, Response},
};

/// The standard timeout layer; its deadline is the handle's
/// [`LayerConfig::timeout`](crate::LayerConfig::timeout).
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeoutLayer;

#[async_trait]
impl Layer for TimeoutLayer {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
        let ctx = next.context();
        let timeout = ctx.config().timeout;
        let operation = req.name();
        let (limit, after) = match &req {
            Request::Close
            | Request::Lock {
                opts: crate::LockOptions { wait: None, .. },
                ..
            } => {
                return next.run(req).await;
            }
            Request::Lock { opts, .. } => {
                let wait = opts.wait.unwrap_or_default();
                (wait.saturating_add(timeout), wait)
            }
            _ => (timeout, timeout),
        };
        match tokio::time::timeout(limit, next.run(req)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                backend: ctx.backend(),
                operation,
                after,
            }),
        }
    }
}
