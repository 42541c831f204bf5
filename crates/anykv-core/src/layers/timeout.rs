//! The per-attempt deadline.
//!
//! Every attempt of an operation is bounded by the handle's timeout (the
//! retry layer above repeats attempts, so the bound is per attempt, not per
//! call). `lock` with `wait: Some(d)` is bounded by `d` plus one timeout for
//! the final round trip and fails with `Timeout { after: d }`; `lock`
//! without a wait and `close` are not bounded.

use std::{future::Future, pin::Pin, sync::Arc, task::Poll, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    error::{Error, Result},
    key::Key,
    layer::{Inner, Layer, Next, Standard},
    layers::request::{Request, Response},
    session::SessionBackend,
    types::{Condition, Version},
};

/// The standard timeout layer; its deadline is the handle's
/// [`LayerConfig::timeout`](crate::LayerConfig::timeout).
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeoutLayer;

#[async_trait]
impl Layer for TimeoutLayer {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
        self.around(req, next).await
    }
}

impl Standard for TimeoutLayer {
    async fn around<N: Inner>(&self, req: Request, next: N) -> Result<Response> {
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
        let backend = ctx.backend();
        match bounded(backend, operation, limit, after, next.run(req)).await? {
            Response::Session(s) => Ok(Response::Session(s.map_backend(|inner| {
                Arc::new(TimedSession {
                    inner,
                    backend,
                    timeout,
                })
            }))),
            other => Ok(other),
        }
    }
}

/// `fut` bounded by `limit`, failing with `Timeout { after }`. The timer is
/// armed only if `fut` is not ready at its first poll (a local store mostly
/// answers at once), from that poll on; boxed then, so that the future of
/// an operation answered at once stays small.
pub(crate) async fn bounded<T>(
    backend: &'static str,
    operation: &'static str,
    limit: Duration,
    after: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    let mut fut = std::pin::pin!(fut);
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Error::Timeout {
                backend,
                operation,
                after,
            })),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// A session's puts and close, each bounded by the timeout.
struct TimedSession {
    inner: Arc<dyn SessionBackend>,
    backend: &'static str,
    timeout: Duration,
}

#[async_trait]
impl SessionBackend for TimedSession {
    fn id(&self) -> String {
        self.inner.id()
    }

    async fn put(&self, key: &Key, value: Bytes, condition: Condition) -> Result<Version> {
        let put = self.inner.put(key, value, condition);
        bounded(self.backend, "session_put", self.timeout, self.timeout, put).await
    }

    async fn close(&self) -> Result<()> {
        let close = self.inner.close();
        bounded(
            self.backend,
            "session_close",
            self.timeout,
            self.timeout,
            close,
        )
        .await
    }
}
