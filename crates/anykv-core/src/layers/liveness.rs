//! Feeds the handle's [`LivenessMonitor`] with
//! every outcome, and reports outages on open watches.
//!
//! It sits above retry: the monitor sees a call's final outcome, not each
//! attempt. `lock` feeds it unless it ran out of wait (the lock being held
//! proves the backend answered); `close` does not. Error items of watch and
//! export streams feed it too.
//!
//! The watchdog: while a handle has watches open, it probes the backend
//! every timeout, and each watch yields one non-terminal `Err(Unavailable)`
//! when liveness turns not-alive (unless the driver already reported the
//! outage on that stream); the watch stays open and goes on once the driver
//! resumes.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use tokio::sync::futures::OwnedNotified;

use crate::{
    error::{Error, Result},
    layer::{Context, Inner, Layer, Next, Standard, WatchTicket},
    layers::request::{Request, Response},
    liveness::LivenessMonitor,
    store::{PairStream, WatchStream},
    types::Event,
};

/// The standard liveness layer (with the watch watchdog).
#[derive(Clone, Copy, Debug, Default)]
pub struct LivenessLayer;

#[async_trait]
impl Layer for LivenessLayer {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
        self.around(req, next).await
    }
}

impl Standard for LivenessLayer {
    async fn around<N: Inner>(&self, req: Request, next: N) -> Result<Response> {
        let ctx = next.context();
        let kind = req.kind();
        let outcome = next.run(req).await;
        match (kind, &outcome) {
            (crate::OpKind::Close, _) => return outcome,
            (crate::OpKind::Lock, Err(Error::Timeout { .. })) => {}
            _ => ctx.liveness().record(&outcome),
        }
        outcome.map(|r| streams(ctx, r))
    }
}

/// The streams of an answer, their errors feeding the liveness monitor
/// (and a watch reporting outages); any other answer as it is.
pub(crate) fn streams(ctx: &Context, resp: Response) -> Response {
    match resp {
        Response::Watch(s) => Response::Watch(watch_outages(ctx, s)),
        Response::Export(s) => Response::Export(feed_errors(ctx.liveness().clone(), s)),
        other => other,
    }
}

fn feed_errors(liveness: Arc<LivenessMonitor>, s: PairStream) -> PairStream {
    s.inspect(move |item| {
        if let Err(e) = item {
            liveness.set(!e.indicates_unreachable());
        }
    })
    .boxed()
}

/// Wraps a watch: stream errors feed liveness, and a turn to not-alive
/// yields one `Err(Unavailable)` per outage.
fn watch_outages(ctx: &Context, stream: WatchStream) -> WatchStream {
    Outages {
        // Taken before the first look at the state: a post in between
        // wakes it.
        posted: ctx.liveness().next_post(),
        inner: stream,
        liveness: ctx.liveness().clone(),
        backend: ctx.backend(),
        signalled: false,
        _ticket: ctx.watchdog_enter(),
    }
    .boxed()
}

pin_project_lite::pin_project! {
    /// A watch with its outages reported. Polled by hand, not an `unfold`
    /// of an `async` step: a waiting stream then holds this and no step
    /// future besides (10,000 idle watches on one handle are the case this
    /// is sized for).
    struct Outages {
        // Resolves at the monitor's next post; renewed each time.
        #[pin]
        posted: OwnedNotified,
        inner: WatchStream,
        liveness: Arc<LivenessMonitor>,
        backend: &'static str,
        // This outage was reported: wait for alive again.
        signalled: bool,
        _ticket: WatchTicket,
    }
}

impl Stream for Outages {
    type Item = Result<Event>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Event>>> {
        let mut this = self.project();
        // Liveness first (as `biased` would): an outage is reported even
        // while the driver still has items.
        // Renewed until one waits (registered with this task), and before
        // the state is read, so no later post is missed.
        while this.posted.as_mut().poll(cx).is_ready() {
            this.posted.set(this.liveness.next_post());
        }
        let alive = this.liveness.is_alive();
        if *this.signalled && alive {
            *this.signalled = false;
        } else if !*this.signalled && !alive {
            *this.signalled = true;
            return Poll::Ready(Some(Err(Error::Unavailable {
                backend: this.backend,
                message: "backend unreachable; the watch resumes by itself".into(),
                source: None,
            })));
        }
        match this.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.liveness.set(!e.indicates_unreachable());
                *this.signalled |= e.indicates_unreachable();
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }
}
