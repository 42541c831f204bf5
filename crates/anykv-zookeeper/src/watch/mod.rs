//! Watches: persistent (recursive) ZooKeeper watches turned into anykv
//! events in revision order, converging after reconnects and session expiry.
//!
//! # How watches map
//!
//! One **hub** task per store serves all of its watches. It holds the
//! server-side watches ([`servers`]): a watch whose key or prefix lies under
//! a `PersistentRecursive` watch already registered (or on a key already
//! watched) shares it, otherwise it registers its own (`Persistent` for a
//! key, `PersistentRecursive` for a prefix). One server watch serves any
//! number of anykv watches: the hub routes each notification to the
//! watches whose range holds the path. Once [`hub::SHARE_AT`] watches have
//! their key or prefix base directly under one parent znode, that parent
//! gets one `PersistentRecursive` watch instead, which takes over theirs
//! (and serves every later one below it): far less client memory and setup
//! requests per watch, for notifications of unwatched siblings too (dropped
//! without a read). Dropping a watch frees its share at once; the last user
//! of a server watch removes it from the server.
//!
//! Each watch is its view of its range (path → pair, [`view`]) and a
//! bounded queue ([`sub`]): no task, channel or timer of its own, so an idle
//! watch costs its view and a few small allocations. Liveness is the
//! session's: the hub learns of disconnections once, from the session's
//! notifications, not per watch.
//!
//! ZooKeeper 3.8 notifications name a path and a change type, nothing else
//! (no data, no zxid). The hub keeps the set of notified paths and reads
//! them in **rounds**, each one pipelined multi-read per 64 paths, shared by
//! every watch on those paths; a delete needs no read (the path is gone, or
//! a later notification asks for a read). Events are emitted after each
//! round, so a change costs one read round trip before its event. Up to
//! four rounds are in flight: a notification that arrives while a read is
//! out is read at once (not after that reply), and rounds are finished in
//! the order they were sent, each treating the paths of the later ones as
//! not read yet:
//!
//! * ZooKeeper sends a session the notifications of a change before any
//!   reply that reflects it, so a notification taken after a reply is for a
//!   change above every zxid that reply showed. The hub records, for each
//!   notified path, the largest zxid seen before the notification was
//!   taken ("above"), and the **watermark** of a round is the smallest of
//!   those over the paths still unread, or the largest zxid seen if none:
//!   every change up to it is read.
//! * [`view::View::apply`] emits deletes (at one above the watch's previous
//!   watermark: ZooKeeper does not report a delete's zxid before 3.9) and
//!   the puts up to the watermark in `mzxid` order; a put above it is read
//!   again in the next round, known to be above its `mzxid - 1` (a held
//!   path read again by a later round no longer bounds the watermark).
//!   Revisions never go down.
//!
//! The argument needs every notification since the last round. A
//! disconnection breaks it: persistent watches can miss events across it
//! (ZOOKEEPER-4698) and zookeeper-client 0.11 does not register them again
//! on reconnect. So a round that sees the connection drop is thrown away;
//! once connected the hub registers every server watch anew (pipelined),
//! `sync`s, re-reads every range and emits each watch's differences. After
//! a session expiry it does the same on a new session: `watch_history:
//! Converge` (no invented, duplicated or reordered event; changes between
//! two reads of a key can be merged).
//!
//! New watches started together are set up together: their server watches
//! registered at once, one `sync`, their ranges read in pipelined
//! multi-reads; `watch()` returns once its watch is registered and read, so
//! no later write is missed.
//!
//! A **slow consumer** never delays the others or the session: the hub
//! never waits on a queue. When a watch's queue (256 events) cannot take a
//! batch, that watch alone is detached: the hub stops delivering to it and
//! leaves its view as the consumer will know it. Once the consumer has
//! drained the queue, the hub re-reads that watch's range and emits the
//! differences (Converge), then delivers as before. Nothing grows without
//! bound: a queue holds at most 256 events, or one re-sync of its range.

mod hub;
mod servers;
mod sub;
mod view;

use std::sync::{Arc, Mutex, MutexGuard};

use anykv_core::{Error, KvPair, Result, Start, Target, WatchStream};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use zookeeper_client as zk;

use self::{
    hub::{Cmd, Hub},
    sub::SubStream,
};
use crate::{
    Inner,
    codec::{self, Node},
    error::BACKEND,
};

/// What a watch covers, as znode paths.
#[derive(Clone, Debug)]
pub(crate) enum Range {
    /// One znode.
    Key(String),
    /// Every znode strictly below this one (`/`: everything but `/zookeeper`).
    Below(String),
}

impl Range {
    fn contains(&self, path: &str) -> bool {
        match self {
            Range::Key(k) => path == k,
            Range::Below(base) if base == "/" => path.len() > 1 && !codec::is_system(path),
            Range::Below(base) => {
                path.len() > base.len() + 1
                    && path.starts_with(base.as_str())
                    && path.as_bytes()[base.len()] == b'/'
            }
        }
    }

    fn path(&self) -> &str {
        match self {
            Range::Key(p) | Range::Below(p) => p,
        }
    }
}

/// The store's hub, if one runs: which one, and how to reach it.
#[derive(Default)]
pub(crate) struct HubHandle {
    slot: Mutex<Slot>,
}

#[derive(Default)]
pub(crate) struct Slot {
    current: Option<(u64, mpsc::UnboundedSender<Cmd>)>,
    next: u64,
}

impl HubHandle {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Slot {
    /// Forgets hub `id` (it is ending): the next watch starts a new one.
    pub(crate) fn clear(&mut self, id: u64) {
        if self.current.as_ref().is_some_and(|(i, _)| *i == id) {
            self.current = None;
        }
    }

    /// Sends `cmd` to the running hub, starting one if none runs.
    fn send(&mut self, cmd: Cmd, inner: &Arc<Inner>) -> mpsc::UnboundedSender<Cmd> {
        let cmd = match &self.current {
            Some((_, tx)) => match tx.send(cmd) {
                Ok(()) => return tx.clone(),
                Err(mpsc::error::SendError(cmd)) => cmd,
            },
            None => cmd,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // Queued before the hub runs: it finds it at once.
        let _ = tx.send(cmd);
        self.next += 1;
        let id = self.next;
        tokio::spawn(Hub::new(id, inner.clone(), rx).run());
        self.current = Some((id, tx.clone()));
        tx
    }
}

/// Starts a watch: the server-side watch and the first read of the range
/// are done before this returns, so no later write is missed.
pub(crate) async fn watch(inner: Arc<Inner>, target: Target, start: Start) -> Result<WatchStream> {
    let range = match &target {
        Target::Key(k) => Range::Key(codec::path_of(k.as_str())),
        Target::Prefix(p) => Range::Below(codec::prefix_path(p.as_str())),
    };
    let (reply, answer) = oneshot::channel();
    let hub = inner.hub.lock().send(
        Cmd::Add {
            range,
            start,
            reply,
        },
        &inner,
    );
    match answer.await {
        Ok(Ok((id, shared))) => Ok(SubStream { id, shared, hub }.boxed()),
        Ok(Err(e)) => Err(e),
        // The hub ended before answering: the store was closed.
        Err(_) => Err(cancelled()),
    }
}

/// The pair of a znode if it is a key.
fn to_pair(path: &str, data: Vec<u8>, stat: &zk::Stat, now: i64) -> Option<KvPair> {
    let key = codec::key_of(path)?;
    match codec::classify(data, stat, now) {
        Node::Key(value) => Some(codec::pair(key, value, stat)),
        Node::NotKey => None,
    }
}

fn cancelled() -> Error {
    Error::Cancelled {
        backend: BACKEND,
        message: "the store was closed".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_is_directory_scoped() {
        let r = Range::Below("/ns/a".into());
        assert!(r.contains("/ns/a/b"));
        assert!(r.contains("/ns/a/b/c"));
        assert!(!r.contains("/ns/a"));
        assert!(!r.contains("/ns/ab"));
        let root = Range::Below("/".into());
        assert!(root.contains("/x"));
        assert!(!root.contains("/"));
        assert!(!root.contains("/zookeeper/quota"));
        assert!(Range::Key("/k".into()).contains("/k"));
        assert!(!Range::Key("/k".into()).contains("/k/x"));
    }
}
