//! One watch's buffer between the shared stream's task and its consumer.
//!
//! The task never waits for a consumer: it appends whole revisions to the
//! buffer and wakes the reader. A buffer holding [`BUFFER`] events or more
//! takes no further revision; the task then cancels that watch on etcd
//! (detaches it) and the consumer, once it has read the buffer empty, asks
//! for it back: the task creates it again from its own last delivered
//! revision + 1. So a consumer that stops reading costs a bounded buffer and
//! never delays the other watches of the stream.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicI64, Ordering},
    },
    task::{Context, Poll, Waker},
};

use anykv_core::{Event, Result};
use futures::Stream;
use tokio::sync::mpsc::UnboundedSender;

use super::shared::Cmd;

/// Events a watch buffers for its consumer before it is detached. A
/// revision is never split, so one large revision may go over.
pub(crate) const BUFFER: usize = 1024;

/// Capacity kept by a buffer read empty; a larger one (after a burst) is
/// given back.
const KEEP: usize = 16;

/// The state shared by a watch's consumer and the stream task.
pub(crate) struct Slot {
    /// The watch's etcd id on its stream (changes when it is re-created
    /// after a detach); written by the stream task only.
    pub(crate) id: AtomicI64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
pub(crate) struct Inner {
    pub(crate) queue: VecDeque<Result<Event>>,
    waker: Option<Waker>,
    /// No item follows the queued ones.
    ended: bool,
    /// Cut off for a full buffer: set by the task under the same lock as
    /// the buffer's last push (a consumer that drains the buffer must find
    /// it, or it would wait for events etcd no longer sends); the consumer
    /// clears it and asks for a resume once it has read the buffer empty.
    pub(crate) detached: bool,
}

impl Slot {
    pub(crate) fn new(id: i64) -> Arc<Slot> {
        Arc::new(Slot {
            id: AtomicI64::new(id),
            inner: Mutex::new(Inner::default()),
        })
    }

    pub(crate) fn id(&self) -> i64 {
        self.id.load(Ordering::Relaxed)
    }

    /// The buffer, locked (a poisoned lock only means a panic elsewhere
    /// while it was held; the queue is still consistent).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one item (an error that does not end the stream).
    pub(crate) fn push(&self, item: Result<Event>) {
        let mut s = self.lock();
        s.queue.push_back(item);
        s.wake();
    }

    /// Appends a last item, or none, and ends the stream.
    pub(crate) fn end(&self, last: Option<Result<Event>>) {
        let mut s = self.lock();
        if let Some(item) = last {
            s.queue.push_back(item);
        }
        s.ended = true;
        s.wake();
    }
}

impl Inner {
    /// Wakes the consumer (call after appending).
    pub(crate) fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// The consumer's end: a stream of the watch's items. Dropping it cancels
/// the etcd watch at once.
pub(crate) struct Receiver {
    pub(crate) slot: Arc<Slot>,
    pub(crate) cmds: UnboundedSender<Cmd>,
}

impl Receiver {
    pub(crate) fn new(slot: Arc<Slot>, cmds: UnboundedSender<Cmd>) -> Receiver {
        Receiver { slot, cmds }
    }
}

impl Stream for Receiver {
    type Item = Result<Event>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut s = this.slot.lock();
        let item = s.queue.pop_front();
        if s.queue.is_empty() {
            if s.queue.capacity() > KEEP {
                s.queue.shrink_to(KEEP);
            }
            if s.detached {
                // Read empty: take the watch back from its last revision
                // (once per detach: the flag is cleared here).
                s.detached = false;
                let _ = this.cmds.send(Cmd::Resume(this.slot.clone()));
            }
        }
        match item {
            Some(item) => Poll::Ready(Some(item)),
            None if s.ended => Poll::Ready(None),
            None => {
                if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // The task may be gone already (its store dropped): nothing to cancel then.
        let _ = self.cmds.send(Cmd::Cancel(self.slot.clone()));
    }
}
