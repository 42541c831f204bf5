//! What the handle adds to every stream it returns: the end at `close()`,
//! and "a watch never ends silently".

use futures::{StreamExt, stream::BoxStream};

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
    struct St<T> {
        kv: Kv,
        inner: BoxStream<'static, Result<T>>,
        closed: tokio::sync::watch::Receiver<bool>,
        done: bool,
        after_error: bool,
    }
    let st = St {
        closed: kv.inner.closed.subscribe(),
        kv: kv.clone(),
        inner: stream,
        done: false,
        after_error: false,
    };
    futures::stream::unfold(st, move |mut st| async move {
        if st.done {
            return None;
        }
        let item = tokio::select! {
            biased;
            _ = st.closed.wait_for(|c| *c) => None,
            item = st.inner.next() => Some(item),
        };
        let Some(item) = item else {
            st.done = true;
            let e = st.kv.inner.closed_error();
            return Some((Err(e), st));
        };
        match item {
            Some(Ok(v)) => {
                st.after_error = false;
                Some((Ok(v), st))
            }
            Some(Err(e)) => {
                st.after_error = true;
                Some((Err(e), st))
            }
            None if endless && !st.after_error => {
                st.done = true;
                let e = Error::Unavailable {
                    backend: st.kv.inner.backend,
                    message: "watch stream ended unexpectedly".into(),
                    source: None,
                };
                Some((Err(e), st))
            }
            None => None,
        }
    })
    .boxed()
}
