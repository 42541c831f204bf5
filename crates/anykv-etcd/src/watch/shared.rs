//! One shared gRPC watch stream and the task that owns it.
//!
//! The task multiplexes up to the hub's bound of watches on one etcd watch
//! stream, each created with an id of its own (`WatchCreateRequest.watch_id`)
//! and cancelled by it. It keeps every watch's resume point (the last
//! revision delivered whole, or vouched for by a progress notification) and
//! fragment reassembly; when the stream breaks it opens one new stream and
//! creates every watch again from its own resume point + 1.
//!
//! Liveness is checked per stream: after a quiet period the task sends one
//! progress request; etcd answers it with a single response for the whole
//! stream (watch id -1, the store revision in its header), and no answer
//! within the timeout counts as a broken stream. That answer also advances
//! the resume point of every watch confirmed before the request, except
//! one still catching up on old history (etcd 3.4 answers with the current
//! revision even then: see [`Watch::behind`]).
//!
//! The task never waits for a consumer (see [`super::slot`]): requests go
//! out through a forwarding task, responses are sorted into per-watch
//! buffers, so neither a slow consumer nor a full request channel can hold
//! up the stream.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anykv_core::{Error, Event, Result};
use etcd_client::{
    WatchClient, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream,
    proto::PbEvent,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{
    cancel_error,
    reads::{KNOWN_KEYS, Known},
    slot::{BUFFER, Slot},
};
use crate::{
    conn::after,
    error::{self, BACKEND, Ctx},
    range::{Range, key_of, pair, rev},
};

/// etcd's event type numbers (mvccpb.Event.EventType).
const PUT: i32 = 0;
const DELETE: i32 = 1;

/// The watch id etcd gives responses that belong to the whole stream (the
/// answer to a progress request).
const STREAM: i64 = -1;

/// What consumers and the hub ask of a stream's task.
pub(crate) enum Cmd {
    /// Create a watch; `reply` once etcd confirmed it.
    Create {
        slot: Arc<Slot>,
        range: Range,
        /// The revision to start after; `None`: now.
        after: Option<u64>,
        /// The range's pairs at `after`, for a watch that gives its events
        /// their previous values itself.
        known: Option<Known>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The consumer is gone: cancel the watch and forget it.
    Cancel(Arc<Slot>),
    /// The consumer read its buffer empty after a detach: create the watch
    /// again from its last revision.
    Resume(Arc<Slot>),
}

/// Where a watch is with respect to etcd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Create request sent (or to be sent on the next stream), not confirmed.
    Creating,
    /// Confirmed at this progress tick (see [`Task::tick`]).
    Active { since: u64 },
    /// Cancelled on etcd for a full buffer, until the consumer asks again.
    Detached,
}

/// One watch as the task keeps it (boxed in the task's map, so that the
/// map's spare capacity costs a pointer per slot, not a whole watch).
struct Watch {
    slot: Arc<Slot>,
    /// The first key of the watched range, exactly sized.
    key: Box<[u8]>,
    /// Its end (empty: the key alone).
    end: Box<[u8]>,
    /// Every event up to this revision was delivered.
    last: u64,
    /// `Start::Now` not yet confirmed: create without a start revision.
    now: bool,
    /// The store revision when etcd confirmed a watch that had history to
    /// catch up on (0: none, or caught up since). etcd 3.4 answers a progress
    /// request with the current revision even while such a watch is still
    /// being sent old events, so that answer must not advance its resume
    /// point until an event or a notification of its own shows it caught up.
    behind: u64,
    /// Events at or below this revision were delivered before a re-create.
    floor: u64,
    /// The watched range's pairs as of `last`, while at most
    /// [`KNOWN_KEYS`]: they give puts their previous values, and the watch
    /// asks etcd for none (see [`super::reads`]). `None`: etcd sends them.
    known: Option<Known>,
    phase: Phase,
    /// The caller of `watch`, until etcd confirms the watch.
    reply: Option<oneshot::Sender<Result<()>>>,
}

impl Watch {
    fn new(slot: Arc<Slot>, range: Range, after: Option<u64>, known: Option<Known>) -> Box<Watch> {
        Box::new(Watch {
            slot,
            key: range.start.into_boxed_slice(),
            end: range.end.into_boxed_slice(),
            last: after.unwrap_or(0),
            now: after.is_none(),
            behind: 0,
            floor: after.unwrap_or(0),
            known,
            phase: Phase::Creating,
            reply: None,
        })
    }

    fn options(&self, id: i64) -> WatchOptions {
        let mut opts = WatchOptions::new()
            .with_watch_id(id)
            // Empty responses that advance the resume point of a quiet watch,
            // so that it does not resume from a compacted revision.
            .with_progress_notify()
            // A revision larger than etcd's request limit (a delete_prefix of
            // a big directory, with previous values) comes in fragments
            // instead of one message over the client's size limit, which
            // would fail the same way at every resume.
            .with_fragment();
        if self.known.is_none() {
            opts = opts.with_prev_key();
        }
        if !self.end.is_empty() {
            opts = opts.with_range(self.end.to_vec());
        }
        if !self.now {
            opts = opts.with_start_revision(
                i64::try_from(self.last.saturating_add(1)).unwrap_or(i64::MAX),
            );
        }
        opts
    }
}

/// A request for the forwarding task.
enum Req {
    Create(Vec<u8>, WatchOptions),
    Cancel(i64),
    Progress,
}

/// An open gRPC stream.
struct Live {
    requests: mpsc::UnboundedSender<Req>,
    responses: WatchResponseStream,
    /// Last time a message arrived (or the stream opened).
    quiet_since: Instant,
    /// A progress request is unanswered since then.
    asked: Option<Instant>,
    /// Ticks of the progress requests not answered yet, oldest first.
    progress: VecDeque<u64>,
    /// Ids of the watches whose create request is not answered yet, in the
    /// order sent: etcd answers them in that order, and names no id (-1)
    /// when it refuses one (etcd 3.4: "permission denied").
    creating: VecDeque<i64>,
}

impl Live {
    fn create(&mut self, id: i64, w: &Watch) {
        self.creating.push_back(id);
        let _ = self
            .requests
            .send(Req::Create(w.key.to_vec(), w.options(id)));
    }
}

/// The task owning one shared stream.
pub(crate) struct Task {
    client: WatchClient,
    timeout: Duration,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    /// Watches on this stream, as counted by the hub.
    load: Arc<AtomicUsize>,
    watches: HashMap<i64, Box<Watch>>,
    /// Events of a fragmented response per watch, until its last fragment
    /// (rare: kept here rather than in every watch).
    fragments: HashMap<i64, Vec<PbEvent>>,
    next_id: i64,
    /// Progress requests sent so far.
    tick: u64,
}

/// Why a gRPC stream is given up.
struct Broken(Error);

impl Task {
    pub(crate) fn new(
        client: WatchClient,
        timeout: Duration,
        cmds: mpsc::UnboundedReceiver<Cmd>,
        load: Arc<AtomicUsize>,
    ) -> Task {
        Task {
            client,
            timeout,
            cmds,
            load,
            watches: HashMap::new(),
            fragments: HashMap::new(),
            next_id: 1,
            tick: 0,
        }
    }

    /// Runs until every sender of commands (the hub and each consumer) is gone.
    pub(crate) async fn run(mut self) {
        let mut live: Option<Live> = None;
        // Since when no stream could be opened, and whether the consumers
        // were told.
        let mut down: Option<(Instant, bool)> = None;
        let mut delay = Duration::from_millis(20);
        loop {
            if live.is_none() && self.wants_stream() {
                match self.open().await {
                    Ok(l) => {
                        live = Some(l);
                        down = None;
                        delay = Duration::from_millis(20);
                    }
                    Err(e) if !e.indicates_unreachable() => {
                        // The watches cannot work (permissions, auth): end them.
                        self.end_all(&e);
                        continue;
                    }
                    Err(e) => {
                        // Callers of `watch` waiting for a new watch learn at
                        // once, as with a failed request.
                        self.refuse_pending(&e);
                        let (since, told) = down.get_or_insert((Instant::now(), false));
                        if !*told && since.elapsed() >= self.timeout {
                            *told = true;
                            self.report_outage(&e);
                        }
                        tokio::select! {
                            c = self.cmds.recv() => match c {
                                Some(c) => self.command(c, None),
                                None => return,
                            },
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let Some(l) = live.as_mut() else {
                match self.cmds.recv().await {
                    Some(c) => self.command(c, None),
                    None => return,
                }
                continue;
            };
            let idle = self.timeout.max(Duration::from_secs(1));
            let wake = match l.asked {
                Some(at) => after(at, self.timeout),
                None => after(l.quiet_since, idle),
            };
            let outcome = tokio::select! {
                c = self.cmds.recv() => match c {
                    Some(c) => {
                        self.command(c, Some(l));
                        Ok(())
                    }
                    None => return,
                },
                m = l.responses.message() => self.received(l, m),
                _ = tokio::time::sleep_until(wake) => {
                    if l.asked.is_some() {
                        Err(Broken(Error::Unavailable {
                            backend: BACKEND,
                            message: format!(
                                "watch: no answer to a progress request within {:?}",
                                self.timeout
                            ),
                            source: None,
                        }))
                    } else {
                        self.tick += 1;
                        l.progress.push_back(self.tick);
                        l.asked = Some(Instant::now());
                        let _ = l.requests.send(Req::Progress);
                        Ok(())
                    }
                }
            };
            if let Err(Broken(e)) = outcome {
                tracing::debug!(error = %e, watches = self.watches.len(), "etcd watch stream broken; resuming every watch");
                live = None;
                self.broken();
            } else if self.watches.is_empty() {
                // Nothing left to watch: let etcd free the stream.
                live = None;
            }
        }
    }

    /// Whether some watch needs etcd (one not detached).
    fn wants_stream(&self) -> bool {
        self.watches.values().any(|w| w.phase != Phase::Detached)
    }

    /// Opens a gRPC stream and sends a create request for every watch not
    /// detached, each from its own resume point.
    async fn open(&mut self) -> Result<Live> {
        self.fragments = HashMap::new();
        let mut creates: Vec<(i64, Vec<u8>, WatchOptions)> = self
            .watches
            .iter_mut()
            .filter(|(_, w)| w.phase != Phase::Detached)
            .map(|(id, w)| {
                w.phase = Phase::Creating;
                (*id, w.key.to_vec(), w.options(*id))
            })
            .collect();
        // Oldest first, as they were made.
        creates.sort_unstable_by_key(|(id, _, _)| *id);
        let mut creates = creates.into_iter();
        let Some((first, key, opts)) = creates.next() else {
            return Err(Error::Unavailable {
                backend: BACKEND,
                message: "watch: nothing to open a stream for".into(),
                source: None,
            });
        };
        let ctx = Ctx::new("watch", None, self.timeout);
        let client = &mut self.client;
        let opening = async move {
            // A member that refuses connections never saw the request: try
            // again at once, the balancer may pick another one.
            let mut refused = 0;
            loop {
                match client.watch(key.clone(), Some(opts.clone())).await {
                    Err(e) if refused < 3 && error::never_sent(&e) => refused += 1,
                    other => break other,
                }
            }
        };
        let stream = match tokio::time::timeout(self.timeout, opening).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(error::map(e, ctx)),
            Err(_) => return Err(ctx.timeout_error()),
        };
        let (sender, responses) = stream.split();
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(forward_requests(sender, queue));
        let mut creating = VecDeque::with_capacity(creates.len() + 1);
        creating.push_back(first);
        for (id, key, opts) in creates {
            creating.push_back(id);
            let _ = requests.send(Req::Create(key, opts));
        }
        Ok(Live {
            requests,
            responses,
            quiet_since: Instant::now(),
            asked: None,
            progress: VecDeque::new(),
            creating,
        })
    }

    fn command(&mut self, cmd: Cmd, live: Option<&mut Live>) {
        match cmd {
            Cmd::Create {
                slot,
                range,
                after,
                known,
                reply,
            } => {
                let id = self.fresh_id();
                slot.id.store(id, Ordering::Relaxed);
                let mut w = Watch::new(slot, range, after, known);
                w.reply = Some(reply);
                if let Some(l) = live {
                    l.create(id, &w);
                }
                self.watches.insert(id, w);
            }
            Cmd::Cancel(slot) => {
                let id = slot.id();
                let ours = self
                    .watches
                    .get(&id)
                    .is_some_and(|w| Arc::ptr_eq(&w.slot, &slot));
                if ours
                    && let Some(w) = self.remove(id)
                    && w.phase != Phase::Detached
                    && let Some(l) = live
                {
                    let _ = l.requests.send(Req::Cancel(id));
                }
            }
            Cmd::Resume(slot) => {
                let old = slot.id();
                let detached = self
                    .watches
                    .get(&old)
                    .is_some_and(|w| Arc::ptr_eq(&w.slot, &slot) && w.phase == Phase::Detached);
                if !detached {
                    return;
                }
                self.recreate(old, live);
            }
        }
    }

    /// Creates watch `old` again, after its last revision, under a new id
    /// (responses to the old one, cancelled, may still be on the way).
    fn recreate(&mut self, old: i64, live: Option<&mut Live>) {
        let Some(mut w) = self.watches.remove(&old) else {
            return;
        };
        self.fragments.remove(&old);
        let id = self.fresh_id();
        w.slot.id.store(id, Ordering::Relaxed);
        w.phase = Phase::Creating;
        w.floor = w.last;
        if let Some(l) = live {
            l.create(id, &w);
        }
        self.watches.insert(id, w);
    }

    fn fresh_id(&mut self) -> i64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// Forgets a watch (its consumer is gone, or its stream ended).
    fn remove(&mut self, id: i64) -> Option<Box<Watch>> {
        self.fragments.remove(&id);
        let w = self.watches.remove(&id)?;
        self.load.fetch_sub(1, Ordering::Relaxed);
        Some(w)
    }

    /// Handles one message of the gRPC stream.
    fn received(
        &mut self,
        l: &mut Live,
        msg: std::result::Result<Option<WatchResponse>, etcd_client::Error>,
    ) -> std::result::Result<(), Broken> {
        l.quiet_since = Instant::now();
        l.asked = None;
        let mut resp = match msg {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                return Err(Broken(Error::Unavailable {
                    backend: BACKEND,
                    message: "watch: stream closed by the server".into(),
                    source: None,
                }));
            }
            Err(e) => return Err(Broken(error::map(e, Ctx::new("watch", None, self.timeout)))),
        };
        let mut id = resp.watch_id();
        if resp.created() {
            // Answers to create requests come in the order they were sent.
            match l.creating.front() {
                Some(&front) if id == STREAM || id == front => {
                    id = front;
                    l.creating.pop_front();
                }
                _ => l.creating.retain(|c| *c != id),
            }
        }
        let header = resp.header().map(|h| rev(h.revision())).unwrap_or(0);
        if id == STREAM && !resp.created() && !resp.canceled() {
            // The answer to a progress request: every event up to `header`
            // was sent, for each watch confirmed before the request went out.
            if let Some(asked_at) = l.progress.pop_front() {
                for (id, w) in self.watches.iter_mut() {
                    if let Phase::Active { since } = w.phase
                        && since < asked_at
                        && (w.behind == 0 || w.last > w.behind)
                        && !self.fragments.contains_key(id)
                    {
                        w.last = w.last.max(header);
                    }
                }
            }
            return Ok(());
        }
        let tick = self.tick;
        let Some(w) = self.watches.get_mut(&id) else {
            return Ok(()); // a cancelled watch's last words
        };
        if w.phase == Phase::Detached {
            return Ok(());
        }
        if resp.canceled() {
            let e = cancel_error(&resp, w.last.saturating_add(1));
            if let Some(reply) = w.reply.take() {
                // The caller of `watch` gets the error; nothing was delivered.
                let _ = reply.send(Err(e));
                self.remove(id);
                return Ok(());
            }
            if e.indicates_unreachable() {
                return Err(Broken(e)); // e.g. the member lost its leader: go elsewhere
            }
            w.slot.end(Some(Err(e)));
            self.remove(id);
            return Ok(());
        }
        if resp.created() {
            if w.now {
                // The watch starts after the revision current at its creation.
                w.now = false;
                w.last = header;
                w.floor = header;
            }
            // etcd serves a watch from a revision it already has as
            // "unsynced" until it has sent the history.
            w.behind = if w.last >= header { 0 } else { header };
            w.phase = Phase::Active { since: tick };
            if let Some(reply) = w.reply.take() {
                let _ = reply.send(Ok(()));
            }
            return Ok(());
        }
        if resp.0.fragment {
            self.fragments
                .entry(id)
                .or_default()
                .append(&mut resp.0.events);
            return Ok(());
        }
        let mut events = std::mem::take(&mut resp.0.events);
        if let Some(mut first) = self.fragments.remove(&id) {
            first.append(&mut events);
            events = first;
        }
        if !deliver(w, header, events) {
            // The consumer is not reading: cut this watch off (only it),
            // until it has read its buffer.
            // (`deliver` marked its slot detached already.)
            w.phase = Phase::Detached;
            tracing::debug!(id, last = w.last, "etcd watch consumer too slow; detached");
            let _ = l.requests.send(Req::Cancel(id));
        } else if w.known.as_ref().is_some_and(|k| k.len() > KNOWN_KEYS) {
            // The range grew past what a watch keeps: from here on etcd
            // sends the previous values.
            w.known = None;
            let _ = l.requests.send(Req::Cancel(id));
            self.recreate(id, Some(l));
        }
        Ok(())
    }

    /// The stream broke: every watch waits for the next stream, from its
    /// own resume point. Callers still waiting for a confirmation wait on.
    fn broken(&mut self) {
        for w in self.watches.values_mut() {
            if w.phase != Phase::Detached {
                w.phase = Phase::Creating;
                w.floor = w.last;
            }
        }
        self.fragments = HashMap::new();
    }

    /// Tells every consumer once that the cluster has been unreachable for
    /// the timeout (their streams go on and resume when it is back).
    fn report_outage(&mut self, e: &Error) {
        for w in self.watches.values() {
            if w.reply.is_none() && w.phase != Phase::Detached {
                w.slot.push(Err(outage(e)));
            }
        }
    }

    /// Fails the watches no caller got yet (waiting for their
    /// confirmation) with `e`.
    fn refuse_pending(&mut self, e: &Error) {
        let pending: Vec<i64> = self
            .watches
            .iter()
            .filter(|(_, w)| w.reply.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in pending {
            if let Some(mut w) = self.remove(id)
                && let Some(reply) = w.reply.take()
            {
                let _ = reply.send(Err(outage(e)));
            }
        }
    }

    /// Ends every watch with `e` (an error retrying cannot cure).
    fn end_all(&mut self, e: &Error) {
        let ids: Vec<i64> = self.watches.keys().copied().collect();
        for id in ids {
            if let Some(mut w) = self.remove(id) {
                match w.reply.take() {
                    Some(reply) => {
                        let _ = reply.send(Err(outage(e)));
                    }
                    None => w.slot.end(Some(Err(outage(e)))),
                }
            }
        }
    }
}

/// A copy of a stream-wide error for one watch (errors are not `Clone`).
fn outage(e: &Error) -> Error {
    match e {
        Error::PermissionDenied { message, .. } => Error::PermissionDenied {
            backend: BACKEND,
            message: message.clone(),
            source: None,
        },
        Error::Unauthenticated { message, .. } => Error::Unauthenticated {
            backend: BACKEND,
            message: message.clone(),
            source: None,
        },
        Error::Timeout {
            operation, after, ..
        } => Error::Timeout {
            backend: BACKEND,
            operation,
            after: *after,
        },
        e if e.indicates_unreachable() => Error::Unavailable {
            backend: BACKEND,
            message: e.to_string(),
            source: None,
        },
        e => Error::backend(BACKEND, format!("watch: {e}"), "stream"),
    }
}

/// Sends the task's requests on the gRPC stream, in order, waiting for room
/// as needed (the task itself never waits). Ends with the stream.
async fn forward_requests(mut sender: WatchRequestSender, mut queue: mpsc::UnboundedReceiver<Req>) {
    while let Some(req) = queue.recv().await {
        let sent = match req {
            Req::Create(key, opts) => sender.watch(key, Some(opts)).await,
            Req::Cancel(id) => sender.cancel(id).await,
            Req::Progress => sender.request_progress().await,
        };
        if sent.is_err() {
            return; // the stream is gone; the task sees it on its side
        }
    }
}

/// Appends the events of one whole response (etcd never splits a revision
/// across responses without `fragment`) to the watch's buffer, a revision at
/// a time. Returns false when the buffer was full before a revision: that
/// revision and the later ones were not delivered (`last` is the last one
/// that was) and the watch is to be detached.
fn deliver(w: &mut Watch, header: u64, events: Vec<PbEvent>) -> bool {
    if events.is_empty() {
        // A progress notification: every event up to `header` was sent
        // (etcd notifies watches that have caught up only).
        w.last = w.last.max(header);
        w.behind = 0;
        return true;
    }
    let mut s = w.slot.lock();
    let mut current = 0;
    for ev in events {
        let Some(kv) = ev.kv else { continue };
        let r = rev(kv.mod_revision);
        if r <= w.floor {
            continue; // replayed after a re-create: already delivered
        }
        if r != current {
            // `current` is whole: the events of one revision are adjacent.
            w.last = w.last.max(current);
            if s.queue.len() >= BUFFER {
                // Marked under the same lock as the buffer's last push: a
                // consumer that reads it empty before the task goes on must
                // see the mark, or it would wait for events never sent and
                // never ask for the watch back.
                s.detached = true;
                s.wake();
                return false;
            }
            current = r;
        }
        let event = match ev.r#type {
            PUT => pair(kv, None).map(|kv| {
                let prev = match &mut w.known {
                    Some(known) => known.put(kv.clone()),
                    None => ev.prev_kv.and_then(|p| pair(p, None)),
                };
                Event::Put { kv, prev }
            }),
            DELETE => key_of(&kv.key).map(|key| {
                if let Some(known) = &mut w.known {
                    known.delete(&key);
                }
                Event::Delete { key, revision: r }
            }),
            _ => None,
        };
        // Keys no anykv client could write (foreign tools) are skipped.
        if let Some(event) = event {
            s.queue.push_back(Ok(event));
        }
    }
    w.last = w.last.max(current);
    s.wake();
    true
}

#[cfg(test)]
mod tests {
    use etcd_client::proto::PbKeyValue;

    use super::*;

    fn kv(key: &str, rev: i64) -> PbKeyValue {
        PbKeyValue {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }
    }

    fn events(list: Vec<(i32, PbKeyValue)>) -> Vec<PbEvent> {
        list.into_iter()
            .map(|(t, kv)| PbEvent {
                r#type: t,
                kv: Some(kv),
                prev_kv: None,
            })
            .collect()
    }

    fn watch(last: u64) -> Watch {
        let range = Range {
            start: b"a".to_vec(),
            end: Vec::new(),
        };
        let mut w = *Watch::new(Slot::new(1), range, Some(last), None);
        w.phase = Phase::Active { since: 0 };
        w
    }

    fn drain(w: &Watch) -> Vec<(String, u64)> {
        let mut s = w.slot.lock();
        s.queue
            .drain(..)
            .map(|item| {
                let e = item.unwrap();
                (e.key().to_string(), e.revision())
            })
            .collect()
    }

    #[test]
    fn a_watch_that_knows_its_range_gives_prev_values_itself() {
        let mut w = watch(10);
        let mut before = kv("a", 5);
        before.value = b"old".to_vec();
        w.known = Some(Known::default());
        w.known.as_mut().unwrap().put(pair(before, None).unwrap());
        // Without the option etcd sends no prev_kv, but one that comes is
        // ignored in favour of what the watch knows (the same, from etcd).
        let mut evs = events(vec![
            (PUT, kv("a", 11)),
            (DELETE, kv("a", 12)),
            (PUT, kv("a", 13)),
        ]);
        evs[0].prev_kv = Some(kv("a", 1));
        assert!(deliver(&mut w, 13, evs));
        // (revision, previous value and its revision)
        type Seen = (u64, Option<(Vec<u8>, u64)>);
        let got: Vec<Seen> = w
            .slot
            .lock()
            .queue
            .drain(..)
            .map(|item| match item.unwrap() {
                Event::Put { kv, prev } => (
                    kv.mod_revision,
                    prev.map(|p| (p.value.to_vec(), p.mod_revision)),
                ),
                Event::Delete { revision, .. } => (revision, None),
            })
            .collect();
        assert_eq!(
            got,
            [(11, Some((b"old".to_vec(), 5))), (12, None), (13, None)],
            "the put after a delete has no previous value"
        );
        let mut known = w.known.take().unwrap();
        assert_eq!(known.len(), 1);
        let last = known.put(pair(kv("a", 14), None).unwrap());
        assert_eq!(last.map(|p| p.mod_revision), Some(13));
    }

    #[test]
    fn replayed_events_at_or_below_the_floor_are_dropped() {
        let mut w = watch(10);
        let evs = events(vec![
            (PUT, kv("a", 10)),
            (DELETE, kv("b", 11)),
            (PUT, kv("c", 12)),
        ]);
        assert!(deliver(&mut w, 12, evs));
        assert_eq!(w.last, 12);
        assert_eq!(drain(&w), [("b".into(), 11), ("c".into(), 12)]);
    }

    #[test]
    fn progress_advances_and_foreign_keys_are_skipped_but_counted() {
        let mut w = watch(0);
        assert!(deliver(&mut w, 40, Vec::new()));
        assert_eq!(w.last, 40);
        let evs = events(vec![(PUT, kv("/abs", 41)), (PUT, kv("ok", 42))]);
        assert!(deliver(&mut w, 42, evs));
        assert_eq!(w.last, 42);
        assert_eq!(drain(&w), [("ok".into(), 42)]);
        // Unknown event types are skipped, not a panic.
        assert!(deliver(&mut w, 43, events(vec![(7, kv("x", 43))])));
        assert_eq!(w.last, 43);
        assert!(drain(&w).is_empty());
    }

    #[test]
    fn a_notification_of_its_own_shows_a_watch_caught_up() {
        let mut w = watch(50);
        w.behind = 100;
        assert!(deliver(&mut w, 120, Vec::new()));
        assert_eq!((w.last, w.behind), (120, 0));
    }

    #[test]
    fn a_full_buffer_stops_at_a_revision_boundary() {
        let mut w = watch(0);
        let first: Vec<_> = (1..=BUFFER as i64 - 1).map(|r| (PUT, kv("k", r))).collect();
        assert!(deliver(&mut w, BUFFER as i64 as u64, events(first)));
        // Two events of one revision go in whole, over the bound; the next
        // revision does not.
        let evs = events(vec![
            (PUT, kv("a", 2000)),
            (PUT, kv("b", 2000)),
            (PUT, kv("c", 2001)),
        ]);
        assert!(!deliver(&mut w, 2001, evs));
        assert_eq!(w.last, 2000);
        let s = w.slot.lock();
        assert_eq!(s.queue.len(), BUFFER + 1);
        assert!(s.detached, "marked with the buffer's lock held");
    }
}
