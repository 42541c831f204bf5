//! Watches that survive a lost connection without gap or duplicate.
//!
//! A background task owns the etcd watch stream and forwards events into a
//! bounded channel; the [`WatchStream`] handed out reads that channel. The
//! task remembers the last revision it delivered completely (or that a
//! progress notification vouched for) and, when the stream breaks (member
//! killed, connection reset, leader lost), opens a new watch from that
//! revision + 1 — on any member, through the balanced channel. Events at or
//! below the remembered revision are dropped, so a replay never duplicates.
//! A member that hangs is found by the task itself: after a quiet period it
//! asks for a progress report, and no answer within the timeout counts as a
//! broken stream.
//! etcd keeps history until it is compacted: if the revision to resume from
//! is gone, the stream yields [`Error::Compacted`] and ends
//! (`WatchHistory::Full`: there is no silent gap).
//!
//! Dropping the stream closes the channel; the task sees it at once (even
//! with no traffic), drops the gRPC stream, and the server cancels its watcher.

use std::time::Duration;

use anykv_core::{Error, Event, Result, Start, Target, WatchStream};
use etcd_client::{
    WatchClient, WatchOptions, WatchResponse, WatchStream as EtcdWatchStream, proto::PbEvent,
};
use futures::StreamExt;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    conn::{Conn, after},
    error::{self, BACKEND, Ctx},
    range::{Range, key_of, pair, rev},
};

/// Events buffered between the task and a slow consumer; when full the task
/// waits, and etcd buffers on its side.
const CHANNEL: usize = 256;

/// etcd's event type numbers (mvccpb.Event.EventType).
const PUT: i32 = 0;
const DELETE: i32 = 1;

struct Watcher {
    client: WatchClient,
    range: Range,
    timeout: Duration,
}

/// Starts a watch. Returns once etcd has confirmed it, so any write made
/// after this returns is seen (for `Start::Now`).
pub(crate) async fn watch(conn: &Conn, target: Target, start: Start) -> Result<WatchStream> {
    let clients = conn.clients().await?;
    let mut w = Watcher {
        client: clients.watch.clone(),
        range: Range::of_target(&target),
        timeout: conn.timeout(),
    };
    let (stream, last) = match start {
        // The watch starts after the revision current at its creation.
        Start::Now => w.open(None).await?,
        Start::After(r) => (w.open(Some(r.saturating_add(1))).await?.0, r),
    };
    let (tx, rx) = mpsc::channel(CHANNEL);
    tokio::spawn(w.run(stream, last, tx));
    Ok(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed())
}

impl Watcher {
    /// Opens a watch from `from` (`None`: now) and waits for etcd to confirm
    /// it. Returns the stream and the revision it was created at.
    async fn open(&mut self, from: Option<u64>) -> Result<(EtcdWatchStream, u64)> {
        let ctx = Ctx::new("watch", None, self.timeout);
        let mut opts = WatchOptions::new()
            .with_prev_key()
            // Empty responses that advance the resume point of a quiet watch,
            // so that it does not resume from a compacted revision.
            .with_progress_notify()
            // A revision larger than etcd's request limit (a delete_prefix of
            // a big directory, with previous values) comes in fragments
            // instead of one message over the client's size limit, which
            // would fail the same way at every resume.
            .with_fragment();
        if !self.range.end.is_empty() {
            opts = opts.with_range(self.range.end.clone());
        }
        if let Some(r) = from {
            opts = opts.with_start_revision(i64::try_from(r).unwrap_or(i64::MAX));
        }
        let start = self.range.start.clone();
        let client = &mut self.client;
        let opening = async move {
            // A member that refuses connections never saw the request: try
            // again at once, the balancer may pick another one.
            let mut refused = 0;
            let mut stream = loop {
                match client.watch(start.clone(), Some(opts.clone())).await {
                    Err(e) if refused < 3 && error::never_sent(&e) => refused += 1,
                    other => break other?,
                }
            };
            let created = stream.message().await?;
            Ok::<_, etcd_client::Error>((stream, created))
        };
        let (stream, created) = match tokio::time::timeout(self.timeout, opening).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(error::map(e, ctx)),
            Err(_) => return Err(ctx.timeout_error()),
        };
        match created {
            Some(resp) if resp.created() && !resp.canceled() => {
                let at = resp.header().map(|h| rev(h.revision())).unwrap_or(0);
                Ok((stream, at))
            }
            Some(resp) => Err(cancel_error(&resp, from.unwrap_or(0))),
            None => Err(Error::Unavailable {
                backend: BACKEND,
                message: "watch: stream closed before the watch was created".into(),
                source: None,
            }),
        }
    }

    /// Forwards events until the consumer goes away or an error ends the watch.
    async fn run(
        mut self,
        mut stream: EtcdWatchStream,
        mut last: u64,
        tx: mpsc::Sender<Result<Event>>,
    ) {
        // Events at or below `floor` were delivered before a re-open.
        let mut floor = last;
        loop {
            let broken = match self.pump(stream, &mut last, floor, &tx).await {
                Pumped::Broken(e) => e,
                Pumped::Done => return,
            };
            tracing::debug!(error = %broken, last, "etcd watch broken; resuming");
            match self.reopen(last, &tx).await {
                Some(s) => {
                    stream = s;
                    floor = last;
                }
                None => return,
            }
        }
    }

    /// Reads one gRPC stream until it breaks. After `idle` without a message
    /// it asks for a progress report; a member that does not answer within
    /// the timeout is taken for hung, and the stream for broken (HTTP/2 pings
    /// would notice too, but only after their own, longer, period).
    async fn pump(
        &self,
        stream: EtcdWatchStream,
        last: &mut u64,
        floor: u64,
        tx: &mpsc::Sender<Result<Event>>,
    ) -> Pumped {
        let (mut requests, mut responses) = stream.split();
        let idle = self.timeout.max(Duration::from_secs(1));
        let mut quiet_since = Instant::now();
        let mut asked: Option<Instant> = None;
        // Events of a fragmented response, until its last fragment.
        let mut fragments: Vec<PbEvent> = Vec::new();
        loop {
            let wake = match asked {
                Some(at) => after(at, self.timeout),
                None => after(quiet_since, idle),
            };
            let msg = tokio::select! {
                _ = tx.closed() => return Pumped::Done,
                m = responses.message() => m,
                _ = tokio::time::sleep_until(wake) => {
                    if asked.is_some() {
                        return Pumped::Broken(Error::Unavailable {
                            backend: BACKEND,
                            message: format!(
                                "watch: no answer to a progress request within {:?}",
                                self.timeout
                            ),
                            source: None,
                        });
                    }
                    if let Err(e) = requests.request_progress().await {
                        return Pumped::Broken(error::map(e, Ctx::new("watch", None, self.timeout)));
                    }
                    asked = Some(Instant::now());
                    continue;
                }
            };
            quiet_since = Instant::now();
            asked = None;
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return Pumped::Broken(Error::Unavailable {
                        backend: BACKEND,
                        message: "watch: stream closed by the server".into(),
                        source: None,
                    });
                }
                Err(e) => {
                    return Pumped::Broken(error::map(e, Ctx::new("watch", None, self.timeout)));
                }
            };
            if resp.canceled() {
                let e = cancel_error(&resp, last.saturating_add(1));
                if e.indicates_unreachable() {
                    return Pumped::Broken(e); // e.g. the member lost its leader: go elsewhere
                }
                let _ = tx.send(Err(e)).await;
                return Pumped::Done;
            }
            if resp.created() {
                continue;
            }
            let mut resp = resp;
            if resp.0.fragment {
                fragments.append(&mut resp.0.events);
                continue;
            }
            if !fragments.is_empty() {
                fragments.append(&mut resp.0.events);
                resp.0.events = std::mem::take(&mut fragments);
            }
            match forward(resp, floor, tx).await {
                Forwarded::Upto(r) => *last = (*last).max(r),
                Forwarded::ConsumerGone => return Pumped::Done,
            }
        }
    }

    /// Re-opens the watch from `last + 1`, retrying with backoff while the
    /// cluster is unreachable. An outage longer than the timeout is reported
    /// once as an `Unavailable` item (the stream goes on); an error that says
    /// the watch cannot work (permissions, auth) ends it.
    async fn reopen(
        &mut self,
        last: u64,
        tx: &mpsc::Sender<Result<Event>>,
    ) -> Option<EtcdWatchStream> {
        let since = Instant::now();
        let mut reported = false;
        let mut delay = Duration::from_millis(20);
        loop {
            match self.open(Some(last.saturating_add(1))).await {
                Ok((s, _)) => return Some(s),
                Err(e) if !e.indicates_unreachable() => {
                    let _ = tx.send(Err(e)).await;
                    return None;
                }
                Err(e) => {
                    if !reported && since.elapsed() >= self.timeout {
                        reported = true;
                        if tx.send(Err(e)).await.is_err() {
                            return None;
                        }
                    }
                    tokio::select! {
                        _ = tx.closed() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

enum Pumped {
    /// The stream broke; resume from the last delivered revision.
    Broken(Error),
    /// The consumer is gone, or a final error was delivered.
    Done,
}

enum Forwarded {
    /// Every event up to this revision was delivered.
    Upto(u64),
    ConsumerGone,
}

/// Sends the events of one response (a whole number of revisions: etcd never
/// splits a revision across responses without `fragment`).
async fn forward(
    mut resp: WatchResponse,
    floor: u64,
    tx: &mpsc::Sender<Result<Event>>,
) -> Forwarded {
    let header = resp.header().map(|h| rev(h.revision())).unwrap_or(0);
    let events = std::mem::take(&mut resp.0.events);
    if events.is_empty() {
        // A progress notification: every event up to `header` was sent.
        return Forwarded::Upto(header);
    }
    let mut upto = 0;
    for ev in events {
        let Some(kv) = ev.kv else { continue };
        let r = rev(kv.mod_revision);
        upto = upto.max(r);
        if r <= floor {
            continue; // replayed after a re-open: already delivered
        }
        let event = match ev.r#type {
            PUT => pair(kv, None).map(|kv| Event::Put {
                kv,
                prev: ev.prev_kv.and_then(|p| pair(p, None)),
            }),
            DELETE => key_of(&kv.key).map(|key| Event::Delete { key, revision: r }),
            _ => None,
        };
        // Keys no anykv client could write (foreign tools) are skipped.
        if let Some(event) = event
            && tx.send(Ok(event)).await.is_err()
        {
            return Forwarded::ConsumerGone;
        }
    }
    Forwarded::Upto(upto)
}

/// The error for a watch etcd cancelled.
fn cancel_error(resp: &WatchResponse, asked: u64) -> Error {
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
    use etcd_client::proto::{PbKeyValue, PbResponseHeader, PbWatchResponse};

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

    fn response(header: i64, events: Vec<(i32, PbKeyValue)>) -> WatchResponse {
        WatchResponse(PbWatchResponse {
            header: Some(PbResponseHeader {
                revision: header,
                ..Default::default()
            }),
            events: events
                .into_iter()
                .map(|(t, kv)| PbEvent {
                    r#type: t,
                    kv: Some(kv),
                    prev_kv: None,
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn drain(rx: &mut mpsc::Receiver<Result<Event>>) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        while let Ok(item) = rx.try_recv() {
            let e = item.unwrap();
            out.push((e.key().to_string(), e.revision()));
        }
        out
    }

    #[tokio::test]
    async fn replayed_events_at_or_below_the_floor_are_dropped() {
        let (tx, mut rx) = mpsc::channel(16);
        let resp = response(
            12,
            vec![
                (PUT, kv("a", 10)),
                (DELETE, kv("b", 11)),
                (PUT, kv("c", 12)),
            ],
        );
        assert!(matches!(forward(resp, 10, &tx).await, Forwarded::Upto(12)));
        assert_eq!(drain(&mut rx).await, [("b".into(), 11), ("c".into(), 12)]);
    }

    #[tokio::test]
    async fn progress_advances_and_foreign_keys_are_skipped_but_counted() {
        let (tx, mut rx) = mpsc::channel(16);
        assert!(matches!(
            forward(response(40, vec![]), 0, &tx).await,
            Forwarded::Upto(40)
        ));
        let resp = response(42, vec![(PUT, kv("/abs", 41)), (PUT, kv("ok", 42))]);
        assert!(matches!(forward(resp, 40, &tx).await, Forwarded::Upto(42)));
        assert_eq!(drain(&mut rx).await, [("ok".into(), 42)]);
        // Unknown event types are skipped, not a panic.
        let resp = response(43, vec![(7, kv("x", 43))]);
        assert!(matches!(forward(resp, 42, &tx).await, Forwarded::Upto(43)));
        assert!(drain(&mut rx).await.is_empty());
    }

    #[test]
    fn cancellations_map_to_compacted_permission_or_retry() {
        let mut r = response(5, vec![]);
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
