//! Watches: registered in the engine's [`Hub`](anykv_core::embedded::hub::Hub), which the
//! writer thread feeds each committed batch; replays and catch-ups read the
//! event log on a blocking thread.
//!
//! A watch is registered *before* the committed revision or the log is
//! read: every commit after that point reaches its buffer, everything
//! before it is in the log, and the overlap is skipped by revision.

use std::sync::Arc;

use anykv_core::{Error, Result, Revision, Start, Target, WatchStream};
use futures::future::BoxFuture;

use crate::{
    engine::Engine,
    error::{self, BACKEND},
    hub::{self, Begin, EventLog, Group},
};

impl EventLog for Engine {
    fn read_after(
        self: Arc<Self>,
        after: Revision,
        max: usize,
    ) -> BoxFuture<'static, Result<Vec<Group>>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || self.replay(after, max))
                .await
                .map_err(|e| Error::backend(BACKEND, "watch replay task failed", e))?
        })
    }
}

/// Starts a watch of `target` from `start`.
pub(crate) async fn watch(
    engine: &Arc<Engine>,
    target: Target,
    start: Start,
) -> Result<WatchStream> {
    let watcher = engine.hub.register(target).ok_or_else(error::closed)?;
    let committed = engine.committed();
    let begin = match start {
        Start::Now => Begin::Now(committed),
        Start::After(after) if after >= committed => Begin::Now(after),
        // Fail the call itself for a start before the retained history,
        // rather than a stream whose first item is the error.
        Start::After(after) => Begin::Log {
            after,
            first: engine.clone().read_after(after, hub::LOG_CHUNK).await?,
        },
    };
    Ok(hub::stream(watcher, engine.clone(), begin, error::closed))
}
