//! The default stack's hot path: a single-key `get`, `put`, `delete` or
//! `exists`, or a `watch`, through all six standard layers, as one flat
//! future.
//!
//! Nested, the six layers' futures hold the request once per level (about
//! 5 KB per call, copied when boxed); this runs the same steps, each the
//! layer's own code, in one small future: the namespace mapping
//! ([`namespace::simple`]), the checks ([`checks::check`]), liveness fed
//! with the final outcome (and wrapping a watch: [`liveness::streams`]),
//! the retry loop ([`RetryPolicy::should_retry`](crate::RetryPolicy)),
//! and each attempt bounded by [`timeout::bounded`]; the driver is called
//! with the request's key by reference, so no attempt copies the request.
//! Watches are here because an application opens thousands at once (a
//! watch per tenant or device), and every one in flight held the nested
//! layers' 4.7 KB until it opened: a hundred opening at a time left ~0.5 MB
//! of freed memory in the allocator, as much again as 1,000 open watches
//! hold. Taken only while no tracing subscriber wants the span (the
//! tracing layer then does nothing); every other request runs through the
//! layers.

use std::future::Future;

use crate::{
    error::Result,
    layer::{Next, Request, Response, standard::StandardRun},
    layers::{checks, liveness, namespace, timeout, trace},
};

/// The fast path's future for `req`, or `req` back when it does not
/// qualify (decided before any await, so the request is held once).
pub(super) fn prepare<'a>(
    stack: &StandardRun,
    req: Request,
    next: Next<'a>,
) -> std::result::Result<impl Future<Output = Result<Response>> + Send + 'a, Request> {
    if !stack.is_full() || trace::interested() {
        return Err(req);
    }
    let ctx = next.ctx;
    let (req, ns) = namespace::simple(&ctx.config().namespace, req)?;
    Ok(async move {
        let out = match checks::check(ctx, req) {
            Ok(req) => {
                let outcome = retried(&req, next).await;
                // The kinds taken here all feed liveness (no lock, no close).
                ctx.liveness().record(&outcome);
                outcome.map(|r| liveness::streams(ctx, r))
            }
            Err(e) => Err(e),
        };
        ns.answer(out)
    })
}

/// The retry layer's loop over timed attempts.
async fn retried(req: &Request, next: Next<'_>) -> Result<Response> {
    let cfg = next.ctx.config();
    let (policy, limit) = (&cfg.retry, cfg.timeout);
    let (backend, operation) = (next.ctx.backend(), req.name());
    let idempotent = req.is_idempotent();
    let mut attempt = 1;
    loop {
        let out = timeout::bounded(backend, operation, limit, limit, once(req, next)).await;
        match out {
            Err(e) if policy.should_retry(&e, idempotent, attempt) => {
                tracing::debug!(attempt, error = %e, "retrying");
                // Not held across the wait: the future stays smaller.
                drop(e);
                // Boxed: rare, and kept out of the common case's future.
                Box::pin(tokio::time::sleep(policy.backoff(attempt))).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// One attempt: the driver called by reference when nothing lies below the
/// standard layers, else the layers below with a copy of the request.
async fn once(req: &Request, next: Next<'_>) -> Result<Response> {
    if !next.layers.is_empty() {
        // The next layer's own boxed future: nothing nested here.
        return next.run(req.clone()).await;
    }
    let store = &*next.ctx.driver;
    Ok(match req {
        Request::Get { key } => Response::Get(store.get(key).await?),
        Request::Put { key, value, opts } => {
            Response::Put(store.put(key, value.clone(), *opts).await?)
        }
        Request::Delete { key, condition } => {
            Response::Delete(store.delete(key, *condition).await?)
        }
        Request::Exists { key } => Response::Exists(store.exists(key).await?),
        Request::Watch { target, start } => {
            Response::Watch(store.watch(target.clone(), *start).await?)
        }
        other => return next.run(other.clone()).await,
    })
}
