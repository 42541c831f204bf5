//! Layers and their composition: what [`Kv`] is made of.
//!
//! [`Kv`] turns every [`Store`](crate::Store) call into a [`Request`], runs it through a
//! stack of [`Layer`]s and unpacks the [`Response`]. The standard stack,
//! outermost first (see `docs/contract.md`):
//!
//! namespace → capability checks → tracing span → liveness → retry →
//! per-attempt timeout → driver
//!
//! Each standard layer lives in its own module under [`layers`](mod@crate::layers).
//! A run of consecutive standard layers executes as one future (one
//! allocation per call, not one per layer); your layers are `dyn Layer`s
//! around or below it. The handle itself keeps what no layer may drop: `close()` (later
//! operations fail with `Cancelled`, watches end with it, held locks are
//! released, each bounded by the timeout) and "a watch never ends silently".
//!
//! ```
//! use anykv_core::{async_trait, Kv, Layer, Next, Request, Response, Result, StandardLayer};
//! # use std::sync::Arc;
//!
//! /// Logs the name of every operation.
//! struct Log;
//!
//! #[async_trait]
//! impl Layer for Log {
//!     async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
//!         let name = req.name();
//!         let out = next.run(req).await;
//!         println!("{name}: {}", if out.is_ok() { "ok" } else { "error" });
//!         out
//!     }
//! }
//!
//! # fn demo(driver: Arc<dyn anykv_core::Store>) {
//! let kv: Kv = Kv::builder_for(driver)
//!     .layer(Log)                        // outermost: sees the caller's keys
//!     .without(StandardLayer::Retry)     // drop a standard layer
//!     .build();
//! # }
//! ```

mod builder;
mod config;
mod context;
mod fast_path;
mod handle;
mod standard;
mod stream_guard;
#[cfg(test)]
mod tests;

use std::{any::Any, sync::Arc};

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::error::Result;

pub use self::{builder::KvBuilder, config::LayerConfig, context::Context, handle::Kv};
pub(crate) use self::{
    context::WatchTicket,
    standard::{Inner, Standard},
};
pub use crate::layers::request::{ImportPairs, OpKind, Request, Response};
pub use crate::layers::retry::RetryPolicy;

/// An interceptor around every operation of a [`Kv`].
///
/// `call` receives each operation as a [`Request`] and passes it on with
/// [`Next::run`] (or answers it itself); it sees every operation, watch,
/// lock and close included, through this one method. To treat some
/// operations apart, match on [`Request::kind`]. Watch and export responses
/// carry their stream, lock responses their guard: a layer may wrap them.
/// [`Next::context`] gives the handle's backend, settings and liveness.
#[async_trait]
pub trait Layer: Any + Send + Sync {
    /// Handles one operation.
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response>;
}

/// The rest of the stack below a layer: pass a request on with [`Next::run`].
///
/// `Copy`, so a layer may run several requests (the retry layer repeats one).
#[derive(Clone, Copy)]
pub struct Next<'a> {
    layers: &'a [Arc<dyn Layer>],
    ctx: &'a Context,
}

impl<'a> Next<'a> {
    /// Runs `req` through the layers below, then the driver.
    ///
    /// Returns the next layer's boxed future as is (no wrapper future per
    /// layer: each layer's own future stays small).
    pub fn run(self, req: Request) -> BoxFuture<'a, Result<Response>> {
        match self.layers.split_first() {
            Some((layer, rest)) => {
                let next = Next {
                    layers: rest,
                    ctx: self.ctx,
                };
                layer.call(req, next)
            }
            // A scoped view shares the driver and must not close it.
            None if matches!(req, Request::Close) && !self.ctx.owns_driver => {
                Box::pin(std::future::ready(Ok(Response::Close)))
            }
            None => Box::pin(req.run_on(&*self.ctx.driver)),
        }
    }

    /// The handle this request runs for.
    pub fn context(&self) -> &'a Context {
        self.ctx
    }

    /// [`run`](Self::run) awaited in the caller's future: the driver's call
    /// needs no box of its own when no layer is left.
    async fn run_unboxed(self, req: Request) -> Result<Response> {
        match self.layers.split_first() {
            Some((layer, rest)) => {
                let next = Next {
                    layers: rest,
                    ctx: self.ctx,
                };
                layer.call(req, next).await
            }
            None if matches!(req, Request::Close) && !self.ctx.owns_driver => Ok(Response::Close),
            None => req.run_on(&*self.ctx.driver).await,
        }
    }
}

/// The standard layers, for [`KvBuilder::without`] and [`KvBuilder::replace`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StandardLayer {
    /// Keys relative to the namespace; hides the reserved root.
    Namespace,
    /// Capability and argument checks before any I/O.
    Checks,
    /// A `tracing` span per operation, with outcome and latency.
    Tracing,
    /// Feeds the liveness monitor; reports outages on open watches.
    Liveness,
    /// Retries idempotent operations (and writes that never reached the server).
    Retry,
    /// Bounds each attempt by the timeout.
    Timeout,
}

impl StandardLayer {
    /// The standard stack, outermost first.
    pub const ORDER: [StandardLayer; 6] = [
        StandardLayer::Namespace,
        StandardLayer::Checks,
        StandardLayer::Tracing,
        StandardLayer::Liveness,
        StandardLayer::Retry,
        StandardLayer::Timeout,
    ];
}
