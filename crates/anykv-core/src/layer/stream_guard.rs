//! What the handle adds to every stream it returns: the end at `close()`,
//! and "a watch never ends silently".

use std::{
    future::Future,
    pin::Pin,
    task::{Context as TaskContext, Poll},
};

use futures::{Stream, StreamExt, stream::BoxStream};
use tokio::sync::futures::OwnedNotified;

use crate::{
    error::{Error, Result},
    layer::Kv,
};

/// Ends a stream with `Err(Cancelled)` when this handle is closed, and
/// turns a watch (`endless`) that ends on its own (which the contract
/// forbids) into a final `Err(Unavailable)`; a stream that ends right
/// after an error item ends cleanly.
pub(super) fn guard_stream<T: Send + 'static>(
    kv: &Kv,
    stream: BoxStream<'static, Result<T>>,
    endless: bool,
) -> BoxStream<'static, Result<T>> {
    Guard {
        closing: kv.inner.closing(),
        kv: kv.clone(),
        inner: stream,
        endless,
        done: false,
        after_error: false,
    }
    .boxed()
}

pin_project_lite::pin_project! {
    /// Polled by hand, not an `unfold` of an `async` step: a waiting
    /// stream then holds this and no step future besides (10,000 idle
    /// watches on one handle are the case this is sized for).
    struct Guard<T> {
        #[pin]
        closing: OwnedNotified,
        kv: Kv,
        inner: BoxStream<'static, Result<T>>,
        endless: bool,
        done: bool,
        after_error: bool,
    }
}

impl<T> Stream for Guard<T> {
    type Item = Result<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<T>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        // The close first, as `biased` would: a closed handle's stream
        // ends even while its driver still has items. The flag catches a
        // close before the stream was made.
        if this.closing.poll(cx).is_ready() || this.kv.inner.is_closed() {
            *this.done = true;
            return Poll::Ready(Some(Err(this.kv.inner.closed_error())));
        }
        match this.inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(v))) => {
                *this.after_error = false;
                Poll::Ready(Some(Ok(v)))
            }
            Poll::Ready(Some(Err(e))) => {
                *this.after_error = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) if *this.endless && !*this.after_error => {
                *this.done = true;
                Poll::Ready(Some(Err(Error::Unavailable {
                    backend: this.kv.inner.backend,
                    message: "watch stream ended unexpectedly".into(),
                    source: None,
                })))
            }
            Poll::Ready(None) => {
                *this.done = true;
                Poll::Ready(None)
            }
        }
    }
}
