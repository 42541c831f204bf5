//! Watches: a replay from the event log, then live batches from the writer,
//! with the log as the fallback whenever the live channel overflows.
//!
//! Gap- and duplicate-freedom comes from one rule: the task remembers the
//! last revision it has processed and only passes on events above it. The
//! live channel is subscribed *before* the log is read, so everything
//! committed after the log snapshot is in the channel; anything the channel
//! dropped (a slow consumer) is read back from the log. If the log has been
//! pruned past that point, the stream yields `Error::Compacted` and ends.

use std::sync::Arc;

use anykv_core::{Event, Result, Revision, Start, Target, WatchStream};
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    engine::{Batch, Engine},
    error::{self, BACKEND},
};

/// Events buffered for a consumer before the task waits for it.
const BUFFER: usize = 256;
/// Revisions read from the log per blocking read.
const REPLAY_CHUNK: usize = 512;

/// Starts a watch of `target` from `start`.
pub(crate) async fn watch(
    engine: &Arc<Engine>,
    target: Target,
    start: Start,
) -> Result<WatchStream> {
    let live = engine.subscribe().ok_or_else(error::closed)?;
    let committed = engine.committed();
    let from = match start {
        Start::Now => committed,
        Start::After(r) => r,
    };
    let (tx, rx) = mpsc::channel(BUFFER);
    let task = Task {
        engine: engine.clone(),
        target,
        last: from,
        out: tx,
    };
    if from < committed {
        // Fail the call itself for a start before the retained history,
        // rather than a stream whose first item is the error.
        let first = task.read_log().await?;
        tokio::spawn(task.run(live, Some(first)));
    } else {
        tokio::spawn(task.run(live, None));
    }
    Ok(ReceiverStream::new(rx).boxed())
}

struct Task {
    engine: Arc<Engine>,
    target: Target,
    /// Last revision processed (delivered or filtered out).
    last: Revision,
    out: mpsc::Sender<Result<Event>>,
}

impl Task {
    /// One chunk of the log after `self.last`, read on a blocking thread.
    async fn read_log(&self) -> Result<Vec<(Revision, Vec<Event>)>> {
        let engine = self.engine.clone();
        let after = self.last;
        tokio::task::spawn_blocking(move || engine.replay(after, REPLAY_CHUNK))
            .await
            .map_err(|e| anykv_core::Error::backend(BACKEND, "watch replay task failed", e))?
    }

    /// Sends the matching events of revisions above `self.last`; false once
    /// the consumer is gone.
    async fn deliver(&mut self, events: &[Event]) -> bool {
        let floor = self.last;
        for ev in events {
            let rev = ev.revision();
            if rev <= floor {
                continue;
            }
            if self.target.matches(ev.key()) && self.out.send(Ok(ev.clone())).await.is_err() {
                return false;
            }
            self.last = self.last.max(rev);
        }
        true
    }

    /// Replays the log from `self.last` to its end; false if the stream ended.
    async fn catch_up(&mut self, mut chunk: Option<Vec<(Revision, Vec<Event>)>>) -> bool {
        loop {
            let revisions = match chunk.take() {
                Some(c) => c,
                None => match self.read_log().await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = self.out.send(Err(e)).await;
                        return false;
                    }
                },
            };
            let full = revisions.len() >= REPLAY_CHUNK;
            for (rev, events) in revisions {
                if !self.deliver(&events).await {
                    return false;
                }
                // Revisions with nothing for this target still count as seen.
                self.last = self.last.max(rev);
            }
            if !full {
                return true;
            }
        }
    }

    async fn run(
        mut self,
        mut live: broadcast::Receiver<Batch>,
        first: Option<Vec<(Revision, Vec<Event>)>>,
    ) {
        if first.is_some() && !self.catch_up(first).await {
            return;
        }
        loop {
            let msg = tokio::select! {
                _ = self.out.closed() => return,
                msg = live.recv() => msg,
            };
            match msg {
                Ok(batch) => {
                    if !self.deliver(&batch).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // The consumer fell behind the live channel: the log has it all.
                    if !self.catch_up(None).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = self.out.send(Err(error::closed())).await;
                    return;
                }
            }
        }
    }
}
