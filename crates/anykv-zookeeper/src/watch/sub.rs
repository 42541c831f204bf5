//! One anykv watch as the consumer holds it: a bounded queue of events the
//! hub fills and the stream drains, with no task or channel of its own.
//!
//! The hub never waits for a consumer. Before it hands a watch a batch it
//! asks [`Shared::room_for`]: a watch whose queue could not take the batch
//! is **detached** instead — the hub stops updating its view and delivering
//! to it, so its view stays what the consumer will know once the queue is
//! drained. When the consumer has drained the queue, the stream asks the hub
//! to re-sync it: the hub re-reads its range and emits the differences from
//! that view (Converge), then delivers as before.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use anykv_core::{Error, Event, Result};
use futures::Stream;
use tokio::sync::mpsc;

use super::hub::Cmd;

/// Events a watch may have queued before it is detached (a single batch
/// into an empty queue may be larger: it is bounded by the range itself).
pub(crate) const BUFFER: usize = 256;

/// Where a watch stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flow {
    /// Delivered to.
    Live,
    /// Its queue was full: nothing delivered until it is drained.
    Detached,
    /// Drained; the hub was asked to re-read its range.
    Resyncing,
    /// Over: the queue ends with its last item.
    Ended,
}

struct Queue {
    events: VecDeque<Result<Event>>,
    waker: Option<Waker>,
    flow: Flow,
}

/// The queue shared by the hub (producer) and the stream (consumer).
pub(crate) struct Shared {
    queue: Mutex<Queue>,
}

impl Shared {
    pub(crate) fn new() -> Arc<Shared> {
        Arc::new(Shared {
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                waker: None,
                flow: Flow::Live,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when up to `n` events may be delivered now. Otherwise the watch
    /// is detached (if it was live) and false: the caller leaves its view
    /// alone. The consumer only takes events out, so the room cannot shrink
    /// before the caller delivers.
    pub(crate) fn room_for(&self, n: usize) -> bool {
        let mut q = self.lock();
        if q.flow != Flow::Live {
            return false;
        }
        if q.events.is_empty() || q.events.len() + n <= BUFFER {
            return true;
        }
        q.flow = Flow::Detached;
        false
    }

    /// True while the hub delivers to this watch.
    pub(crate) fn is_live(&self) -> bool {
        self.lock().flow == Flow::Live
    }

    /// After a re-sync: delivered to again.
    pub(crate) fn resume(&self) {
        let mut q = self.lock();
        if q.flow == Flow::Resyncing {
            q.flow = Flow::Live;
        }
    }

    /// Queues events (after [`Shared::room_for`] said yes).
    pub(crate) fn push(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let mut q = self.lock();
        q.events.extend(events.into_iter().map(Ok));
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }

    /// Ends the watch, with a last error if given.
    pub(crate) fn end(&self, last: Option<Error>) {
        let mut q = self.lock();
        if q.flow == Flow::Ended {
            return;
        }
        q.flow = Flow::Ended;
        if let Some(e) = last {
            q.events.push_back(Err(e));
        }
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }
}

/// The consumer's end: a stream over the shared queue that tells the hub
/// when it is dropped (its share is freed at once) or drained after a
/// detachment (re-sync it).
pub(crate) struct SubStream {
    pub(crate) id: u64,
    pub(crate) shared: Arc<Shared>,
    pub(crate) hub: mpsc::UnboundedSender<Cmd>,
}

impl Stream for SubStream {
    type Item = Result<Event>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut q = this.shared.lock();
        if let Some(item) = q.events.pop_front() {
            if q.events.is_empty() && q.events.capacity() > BUFFER {
                // A large re-sync batch: give the memory back.
                q.events.shrink_to(BUFFER / 4);
            }
            return Poll::Ready(Some(item));
        }
        match q.flow {
            Flow::Ended => return Poll::Ready(None),
            Flow::Detached => {
                q.flow = Flow::Resyncing;
                // A hub that is gone has ended (or will end) the watch.
                let _ = this.hub.send(Cmd::Resync(this.id));
            }
            Flow::Live | Flow::Resyncing => {}
        }
        if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            q.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for SubStream {
    fn drop(&mut self) {
        let _ = self.hub.send(Cmd::Drop(self.id));
    }
}
