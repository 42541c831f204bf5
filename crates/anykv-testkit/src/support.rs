//! What scenarios share: the context and a few assertions.

use std::{fmt::Debug, sync::Arc, time::Duration};

use anykv_core::{
    Capabilities, Error, ErrorKind, Event, Key, Kv, Prefix, Result, Store, WatchStream,
};
use futures::StreamExt;

/// A scenario's view of the store under test.
#[derive(Clone)]
pub struct Ctx {
    base: Arc<Kv>,
    ns: Prefix,
    backend: String,
    /// The store scoped to this scenario's namespace.
    pub kv: Kv,
}

impl Ctx {
    pub(crate) fn new(base: Arc<Kv>, ns: Prefix, backend: &str) -> Ctx {
        Ctx {
            kv: base.scoped(&ns),
            base,
            ns,
            backend: backend.to_owned(),
        }
    }

    /// A second handle on the same namespace (its own liveness and watches).
    pub fn other_handle(&self) -> Kv {
        self.base.scoped(&self.ns)
    }

    /// A handle on a sibling namespace of this scenario.
    pub fn sibling(&self, name: &str) -> Kv {
        self.base.scoped(&self.ns.join_prefix(&prefix(name)))
    }

    /// The scenario's namespace view.
    pub fn ns_view(&self, name: &str) -> Kv {
        self.sibling(name)
    }

    /// Capabilities of the backend.
    pub fn caps(&self) -> &Capabilities {
        self.kv.capabilities()
    }

    /// Name given to the run.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    pub(crate) async fn cleanup(&self) {
        // Best effort: a scenario's data must not pile up on a shared server.
        let _ = self
            .base
            .scoped(&self.ns)
            .delete_prefix(&Prefix::root())
            .await;
    }
}

/// A key, panicking on an invalid literal (scenario code only).
pub fn key(s: &str) -> Key {
    match Key::new(s) {
        Ok(k) => k,
        Err(e) => panic!("scenario key {s:?}: {e}"),
    }
}

/// A prefix, panicking on an invalid literal (scenario code only).
pub fn prefix(s: &str) -> Prefix {
    match Prefix::new(s) {
        Ok(p) => p,
        Err(e) => panic!("scenario prefix {s:?}: {e}"),
    }
}

/// Unwraps an `Ok`, failing with the operation's name.
#[track_caller]
pub fn ok<T>(what: &str, r: Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: unexpected error: {e} ({:?})", e.kind()),
    }
}

/// Asserts an `Err` of the given kind.
#[track_caller]
pub fn err_kind<T: Debug>(what: &str, r: Result<T>, kind: ErrorKind) -> Error {
    match r {
        Ok(v) => panic!("{what}: expected {kind:?}, got Ok({v:?})"),
        Err(e) if e.kind() == kind => e,
        Err(e) => panic!("{what}: expected {kind:?}, got {:?}: {e}", e.kind()),
    }
}

/// How long a watch may take to deliver an event.
pub const EVENT_WAIT: Duration = Duration::from_secs(15);

/// The next event, failing on timeout, error or end of stream.
pub async fn next_event(what: &str, w: &mut WatchStream) -> Event {
    match tokio::time::timeout(EVENT_WAIT, w.next()).await {
        Err(_) => panic!("{what}: no event within {EVENT_WAIT:?}"),
        Ok(None) => panic!("{what}: watch stream ended"),
        Ok(Some(Err(e))) => panic!("{what}: watch error: {e}"),
        Ok(Some(Ok(ev))) => ev,
    }
}

/// Asserts that no event arrives for `quiet`.
pub async fn no_event(what: &str, w: &mut WatchStream, quiet: Duration) {
    if let Ok(item) = tokio::time::timeout(quiet, w.next()).await {
        panic!("{what}: expected no event, got {item:?}");
    }
}

/// Polls `check` every 100 ms until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not true within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Gives a fresh watch time to be established server-side on backends that
/// confirm asynchronously, so that a write right after is not missed.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// The value bytes of an event, if it is a put.
pub fn put_value(ev: &Event) -> Option<&[u8]> {
    match ev {
        Event::Put { kv, .. } => Some(&kv.value),
        Event::Delete { .. } => None,
    }
}

/// The current mod revision of a key (which must exist).
pub async fn revision_of(kv: &Kv, k: &Key) -> u64 {
    match ok("get for revision", kv.get(k).await) {
        Some(p) => p.mod_revision,
        None => panic!("{k} expected to exist"),
    }
}
