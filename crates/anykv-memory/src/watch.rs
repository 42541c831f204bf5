//! Watch streams: replay from the event log, then follow the live broadcast,
//! skipping by sequence number so that nothing is delivered twice.

use std::{collections::VecDeque, sync::Arc};

use anykv_core::{Error, Event, Result, Start, Target, WatchStream};
use futures::StreamExt;
use tokio::sync::broadcast::{Receiver, error::RecvError};

use crate::{
    Shared,
    state::{BACKEND, Sequenced},
};

struct Cursor {
    shared: Arc<Shared>,
    target: Target,
    backlog: VecDeque<Sequenced>,
    live: Receiver<Sequenced>,
    last_seq: u64,
    last_rev: u64,
    done: bool,
}

pub(crate) fn open(shared: Arc<Shared>, target: Target, start: Start) -> Result<WatchStream> {
    let (backlog, live, last_seq) = {
        let mut st = shared.lock();
        st.expire(tokio::time::Instant::now());
        // Subscribing and reading the log under one lock: the log holds exactly
        // what happened before the subscription.
        let live = st.events.subscribe();
        let backlog = match start {
            Start::Now => Vec::new(),
            Start::After(rev) => st.since_revision(rev)?,
        };
        (VecDeque::from(backlog), live, st.seq())
    };
    // The backlog ends at or before `last_seq` and the subscription starts
    // after it, so the sequence check below never drops a fresh event.
    let cursor = Cursor {
        shared,
        target,
        last_seq: backlog.front().map_or(last_seq, |(s, _)| s - 1),
        backlog,
        live,
        last_rev: 0,
        done: false,
    };
    Ok(futures::stream::unfold(cursor, next).boxed())
}

async fn next(mut c: Cursor) -> Option<(Result<Event>, Cursor)> {
    if c.done {
        return None;
    }
    loop {
        let (seq, event) = match c.backlog.pop_front() {
            Some(item) => item,
            None => match c.live.recv().await {
                Ok(item) => item,
                Err(RecvError::Lagged(_)) => {
                    // Fell behind the broadcast: refill from the log.
                    let refill = c.shared.lock().since_seq(c.last_seq, c.last_rev);
                    match refill {
                        Ok(items) => {
                            c.backlog = items.into();
                            continue;
                        }
                        Err(e) => {
                            c.done = true;
                            return Some((Err(e), c));
                        }
                    }
                }
                Err(RecvError::Closed) => {
                    c.done = true;
                    return Some((
                        Err(Error::Unavailable {
                            backend: BACKEND,
                            message: "store closed".into(),
                            source: None,
                        }),
                        c,
                    ));
                }
            },
        };
        if seq <= c.last_seq {
            continue;
        }
        c.last_seq = seq;
        c.last_rev = event.revision();
        if c.target.matches(event.key()) {
            return Some((Ok(event), c));
        }
    }
}
