//! Watch streams: registered in the store's [`Hub`](anykv_core::embedded::hub::Hub) and
//! replayed from the event log, both under the state lock.

use std::sync::Arc;

use anykv_core::{Error, Result, Revision, Start, Target, WatchStream};
use futures::future::BoxFuture;

use crate::{
    Shared,
    hub::{self, Begin, EventLog, Group},
    state::BACKEND,
};

impl EventLog for Shared {
    fn read_after(
        self: Arc<Self>,
        after: Revision,
        max: usize,
    ) -> BoxFuture<'static, Result<Vec<Group>>> {
        let read = self.lock().log_after(after, max);
        Box::pin(std::future::ready(read))
    }
}

fn closed() -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: "store closed".into(),
        source: None,
    }
}

pub(crate) fn open(shared: Arc<Shared>, target: Target, start: Start) -> Result<WatchStream> {
    let (watcher, begin) = {
        let mut st = shared.lock();
        st.expire(tokio::time::Instant::now());
        // Registering and reading the log under one lock: every event is
        // either in what was read or routed to the new watch, not both.
        let watcher = shared.hub.register(target).ok_or_else(closed)?;
        let begin = match start {
            Start::Now => Begin::Now(st.revision()),
            Start::After(after) => Begin::Log {
                after,
                first: st.log_after(after, hub::LOG_CHUNK)?,
            },
        };
        (watcher, begin)
    };
    Ok(hub::stream(watcher, shared, begin, closed))
}
