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

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;

use crate::{
    error::{Error, Result},
    layer::{Context, Inner, Layer, Next, Standard, WatchTicket},
    layers::request::{Request, Response},
    liveness::LivenessMonitor,
    store::{PairStream, WatchStream},
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
        Ok(match outcome? {
            Response::Watch(s) => Response::Watch(watch_outages(ctx, s)),
            Response::Export(s) => Response::Export(feed_errors(ctx.liveness().clone(), s)),
            other => other,
        })
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
    struct St {
        inner: WatchStream,
        liveness: Arc<LivenessMonitor>,
        backend: &'static str,
        alive: Option<tokio::sync::watch::Receiver<bool>>,
        /// This outage was reported: wait for alive again.
        signalled: bool,
        _ticket: WatchTicket,
    }
    let st = St {
        inner: stream,
        liveness: ctx.liveness().clone(),
        backend: ctx.backend(),
        alive: Some(ctx.liveness().state()),
        signalled: false,
        _ticket: ctx.watchdog_enter(),
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            // Reported outage: wait for alive again; else for not-alive.
            let want = st.signalled;
            let alive = async {
                match st.alive.as_mut() {
                    Some(rx) => rx.wait_for(|a| *a == want).await.is_ok(),
                    None => futures::future::pending().await,
                }
            };
            let item = tokio::select! {
                biased;
                changed = alive => Err(changed),
                item = st.inner.next() => Ok(item),
            };
            match item {
                Err(false) => st.alive = None, // monitor gone: nothing more to report
                Err(true) if want => st.signalled = false,
                Err(true) => {
                    st.signalled = true;
                    let e = Error::Unavailable {
                        backend: st.backend,
                        message: "backend unreachable; the watch resumes by itself".into(),
                        source: None,
                    };
                    return Some((Err(e), st));
                }
                Ok(Some(Err(e))) => {
                    st.liveness.set(!e.indicates_unreachable());
                    st.signalled |= e.indicates_unreachable();
                    return Some((Err(e), st));
                }
                Ok(Some(Ok(ev))) => return Some((Ok(ev), st)),
                Ok(None) => return None,
            }
        }
    })
    .boxed()
}
