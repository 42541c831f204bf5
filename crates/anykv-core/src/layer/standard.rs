//! A run of consecutive standard layers, executed as one future.
//!
//! As `dyn Layer`s each standard layer would cost a boxed future per call
//! (six per operation); here each is a [`Standard`] whose `around` is
//! generic over what lies below ([`Inner`]), so the run composes at compile
//! time into one future: one box for the whole run (and none for the
//! default stack's single-key operations: see `fast_path`). A dropped layer is skipped; a
//! replaced one splits the run around the replacement (see the builder).

use std::{any::Any, future::Future};

use futures::future::{BoxFuture, Either};

use crate::{
    error::Result,
    layer::{Context, Layer, Next, Request, Response, StandardLayer},
    layers::{
        checks::ChecksLayer, liveness::LivenessLayer, namespace::NamespaceLayer, retry::RetryLayer,
        timeout::TimeoutLayer, trace::TracingLayer,
    },
};

/// What a standard layer passes a request on to: the [`Next`] of the
/// `dyn Layer`s and driver below, or the next layer of a fused run.
// No lifetime parameter: the `Send` proof of the handle's futures needs
// `Inner` to hold for any lifetime (rust-lang/rust#100013).
pub(crate) trait Inner: Copy + Send + Sync {
    /// The handle the request runs for.
    fn context(&self) -> &Context;
    /// Runs `req` through the rest of the stack.
    fn run(self, req: Request) -> impl Future<Output = Result<Response>> + Send;
}

impl Inner for Next<'_> {
    fn context(&self) -> &Context {
        self.ctx
    }

    fn run(self, req: Request) -> impl Future<Output = Result<Response>> + Send {
        self.run_unboxed(req)
    }
}

/// A standard layer, generic over what lies below it.
pub(crate) trait Standard: Layer {
    /// The layer's work around `next` (its `Layer::call` is this over a
    /// [`Next`]).
    fn around<N: Inner>(
        &self,
        req: Request,
        next: N,
    ) -> impl Future<Output = Result<Response>> + Send;
}

/// One layer of a fused run, present or dropped, over the rest.
struct Step<'a, L, N> {
    layer: Option<&'a L>,
    next: N,
}

impl<L, N: Copy> Clone for Step<'_, L, N> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<L, N: Copy> Copy for Step<'_, L, N> {}

impl<L: Standard, N: Inner> Inner for Step<'_, L, N> {
    fn context(&self) -> &Context {
        self.next.context()
    }

    async fn run(self, req: Request) -> Result<Response> {
        match self.layer {
            Some(layer) => layer.around(req, self.next).await,
            None => self.next.run(req).await,
        }
    }
}

/// Consecutive standard layers (in [`StandardLayer::ORDER`]; those absent
/// were dropped or lie in another run) as one layer.
#[derive(Default)]
pub(crate) struct StandardRun {
    namespace: Option<NamespaceLayer>,
    checks: Option<ChecksLayer>,
    tracing: Option<TracingLayer>,
    liveness: Option<LivenessLayer>,
    retry: Option<RetryLayer>,
    timeout: Option<TimeoutLayer>,
}

impl StandardRun {
    /// Adds a standard layer to the run.
    pub(crate) fn add(&mut self, which: StandardLayer) {
        match which {
            StandardLayer::Namespace => self.namespace = Some(NamespaceLayer),
            StandardLayer::Checks => self.checks = Some(ChecksLayer),
            StandardLayer::Tracing => self.tracing = Some(TracingLayer),
            StandardLayer::Liveness => self.liveness = Some(LivenessLayer),
            StandardLayer::Retry => self.retry = Some(RetryLayer),
            StandardLayer::Timeout => self.timeout = Some(TimeoutLayer),
        }
    }

    /// The run's layer of type `L`, if it holds one (for `Kv::layer`).
    pub(crate) fn find<L: Layer>(&self) -> Option<&L> {
        fn any<T: Any>(l: &Option<T>) -> Option<&dyn Any> {
            l.as_ref().map(|l| l as &dyn Any)
        }
        [
            any(&self.namespace),
            any(&self.checks),
            any(&self.tracing),
            any(&self.liveness),
            any(&self.retry),
            any(&self.timeout),
        ]
        .into_iter()
        .flatten()
        .find_map(|l| l.downcast_ref::<L>())
    }

    /// Whether the run holds all six standard layers.
    pub(super) fn is_full(&self) -> bool {
        self.namespace.is_some()
            && self.checks.is_some()
            && self.tracing.is_some()
            && self.liveness.is_some()
            && self.retry.is_some()
            && self.timeout.is_some()
    }

    /// Runs `req` through the run, then `next`: on the fast path when it
    /// qualifies, else through the composed layers (boxed, so that the
    /// common case's future stays small).
    pub(crate) fn run<'a>(
        &'a self,
        req: Request,
        next: Next<'a>,
    ) -> impl Future<Output = Result<Response>> + Send + 'a {
        match super::fast_path::prepare(self, req, next) {
            Ok(fast) => Either::Left(fast),
            Err(req) => Either::Right(Box::pin(self.compose(req, next))),
        }
    }

    /// The layers of the run composed, each over the next, in one future.
    async fn compose<'a>(&'a self, req: Request, next: Next<'a>) -> Result<Response> {
        let timeout = Step {
            layer: self.timeout.as_ref(),
            next,
        };
        let retry = Step {
            layer: self.retry.as_ref(),
            next: timeout,
        };
        let liveness = Step {
            layer: self.liveness.as_ref(),
            next: retry,
        };
        let tracing = Step {
            layer: self.tracing.as_ref(),
            next: liveness,
        };
        let checks = Step {
            layer: self.checks.as_ref(),
            next: tracing,
        };
        let namespace = Step {
            layer: self.namespace.as_ref(),
            next: checks,
        };
        namespace.run(req).await
    }
}

// By hand rather than through `#[async_trait]`: the fast path's future
// is boxed as is and the composed one's box is handed on, with no wrapper
// future holding the request again (this is the signature the macro
// writes).
impl Layer for StandardRun {
    fn call<'life0, 'life1, 'async_trait>(
        &'life0 self,
        req: Request,
        next: Next<'life1>,
    ) -> BoxFuture<'async_trait, Result<Response>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        match super::fast_path::prepare(self, req, next) {
            Ok(fast) => Box::pin(fast),
            Err(req) => Box::pin(self.compose(req, next)),
        }
    }
}
