//! Watches: every watch of a store multiplexed on a few shared gRPC watch
//! streams, each resumed without gap or duplicate after a lost connection.
//!
//! The [`Hub`] of a store hands each new watch to a shared stream with room
//! (at most [`EtcdOptions::watches_per_stream`](crate::EtcdOptions) watches,
//! 1,000 by default) and starts a new stream when all are full. Each stream
//! is one etcd watch stream owned by one task ([`shared`]), which creates and
//! cancels its watches by id and keeps, per watch, the last revision it
//! delivered completely (or that a progress notification vouched for). When
//! the stream breaks (member killed, connection reset, leader lost, no
//! answer to a progress request) the task opens one new stream, on any
//! member through the balanced channel, and creates every watch again from
//! its own revision + 1; events at or below it are dropped, so a replay never
//! duplicates. etcd keeps history until it is compacted: if a watch's resume
//! point is gone, that watch yields [`Error::Compacted`] and ends
//! (`WatchHistory::Full`: there is no silent gap).
//!
//! Each watch has a bounded buffer ([`slot`]); a consumer that stops
//! reading gets its watch detached (cancelled on etcd) when the buffer is
//! full, and resumed from its own last revision once it has read the buffer
//! empty. The other watches of the stream never wait for it.
//!
//! Dropping the stream cancels its etcd watch at once (`WatchCancelRequest`)
//! and frees its state; a stream left without watches is closed.

mod reads;
mod shared;
mod slot;

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use anykv_core::{Error, Result, Start, Target, WatchStream};
use etcd_client::WatchResponse;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use self::{
    shared::{Cmd, Task},
    slot::{Receiver, Slot},
};
use crate::{
    conn::Conn,
    error::{BACKEND, Ctx},
    range::{Range, rev},
};

/// Watches per shared stream unless the options say otherwise.
pub const DEFAULT_WATCHES_PER_STREAM: usize = 1000;

/// The shared streams of one store.
pub(crate) struct Hub {
    streams: Mutex<Vec<Stream>>,
    reads: reads::Reads,
}

/// The hub's handle on one shared stream.
struct Stream {
    cmds: mpsc::UnboundedSender<Cmd>,
    /// Watches on it (incremented here, decremented by its task).
    load: Arc<AtomicUsize>,
}

impl Hub {
    pub(crate) fn new() -> Hub {
        Hub {
            streams: Mutex::new(Vec::new()),
            reads: reads::Reads::default(),
        }
    }

    /// A stream with room for one more watch, counted in; a new one if
    /// every stream is full.
    fn pick(&self, conn: &Conn, client: &etcd_client::WatchClient) -> mpsc::UnboundedSender<Cmd> {
        let bound = conn.opts.watches_per_stream.max(1);
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.retain(|s| !s.cmds.is_closed());
        if let Some(s) = streams
            .iter()
            .find(|s| s.load.load(Ordering::Relaxed) < bound)
        {
            s.load.fetch_add(1, Ordering::Relaxed);
            return s.cmds.clone();
        }
        let (cmds, rx) = mpsc::unbounded_channel();
        let load = Arc::new(AtomicUsize::new(1));
        tokio::spawn(Task::new(client.clone(), conn.timeout(), rx, load.clone()).run());
        streams.push(Stream {
            cmds: cmds.clone(),
            load,
        });
        cmds
    }
}

/// Starts a watch. Returns once etcd has confirmed it, so any write made
/// after this returns is seen (for `Start::Now`).
pub(crate) async fn watch(conn: &Conn, target: Target, start: Start) -> Result<WatchStream> {
    let clients = conn.clients().await?;
    // One deadline for the read and the confirmation.
    let deadline = tokio::time::Instant::now() + conn.timeout();
    let range = Range::of_target(&target);
    let (after, known) = match start {
        // Starts after a read of the range (see `reads`), or, if that
        // fails, now.
        Start::Now => {
            let read = conn
                .watches
                .reads
                .read(&clients.kv, conn.timeout(), range.clone());
            match tokio::time::timeout_at(deadline, read).await {
                Ok(Some((at, known))) => (Some(at), known),
                Ok(None) | Err(_) => (None, None),
            }
        }
        Start::After(r) => (Some(r), None),
    };
    // Counted in a stream from here on: nothing may return before the
    // create command is sent.
    let cmds = conn.watches.pick(conn, &clients.watch);
    let slot = Slot::new(0);
    let (reply, confirmed) = oneshot::channel();
    let create = Cmd::Create {
        slot: slot.clone(),
        range,
        after,
        known,
        reply,
    };
    if cmds.send(create).is_err() {
        return Err(Error::Unavailable {
            backend: BACKEND,
            message: "watch: the shared stream's task is gone".into(),
            source: None,
        });
    }
    // From here on, dropping the receiver (on error or timeout too) cancels.
    let receiver = Receiver::new(slot, cmds);
    let ctx = Ctx::new("watch", None, conn.timeout());
    match tokio::time::timeout_at(deadline, confirmed).await {
        Ok(Ok(Ok(()))) => Ok(receiver.boxed()),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => Err(Error::Unavailable {
            backend: BACKEND,
            message: "watch: the shared stream's task ended before confirming".into(),
            source: None,
        }),
        Err(_) => Err(ctx.timeout_error()),
    }
}

/// The error for a watch etcd cancelled.
pub(crate) fn cancel_error(resp: &WatchResponse, asked: u64) -> Error {
    if resp.compact_revision() > 0 {
        return Error::Compacted {
            backend: BACKEND,
            revision: asked,
            oldest: rev(resp.compact_revision()),
        };
    }
    let reason = resp.cancel_reason();
    let lower = reason.to_ascii_lowercase();
    if lower.contains("permission denied") {
        Error::PermissionDenied {
            backend: BACKEND,
            message: format!("watch: {reason}"),
            source: None,
        }
    } else if lower.contains("auth") {
        Error::Unauthenticated {
            backend: BACKEND,
            message: format!("watch: {reason}"),
            source: None,
        }
    } else {
        // "no leader", shutdown, or no reason: try again elsewhere.
        Error::Unavailable {
            backend: BACKEND,
            message: format!("watch cancelled by the server: {reason}"),
            source: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use etcd_client::proto::{PbResponseHeader, PbWatchResponse};

    use super::*;

    fn response(header: i64) -> WatchResponse {
        WatchResponse(PbWatchResponse {
            header: Some(PbResponseHeader {
                revision: header,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn cancellations_map_to_compacted_permission_or_retry() {
        let mut r = response(5);
        r.0.canceled = true;
        r.0.compact_revision = 9;
        assert!(matches!(
            cancel_error(&r, 3),
            Error::Compacted {
                revision: 3,
                oldest: 9,
                ..
            }
        ));
        r.0.compact_revision = 0;
        r.0.cancel_reason = "etcdserver: permission denied".into();
        assert!(matches!(
            cancel_error(&r, 3),
            Error::PermissionDenied { .. }
        ));
        r.0.cancel_reason = "etcdserver: no leader".into();
        assert!(cancel_error(&r, 3).indicates_unreachable());
    }
}
