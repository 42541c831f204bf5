//! Keys relative to the handle's namespace.
//!
//! Maps every key, prefix, watch target, atomic check and imported pair
//! into the namespace on the way down, and every pair, event, guard and
//! error key back on the way up. Keys outside the namespace or under the
//! reserved root (`__anykv`) never reach the caller; `delete_prefix` of the
//! whole backend spares the reserved root. Locks live at
//! `__anykv/locks/<namespace>/<key>`.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::{
    error::{Error, Result},
    key::{Key, Prefix, RESERVED_ROOT},
    layer::{Inner, Layer, Next, Standard},
    layers::request::{Request, Response},
    session::SessionBackend,
    store::WatchStream,
    types::{Check, Condition, Event, KvPair, Op, Snapshot, Target, Version},
};

/// The standard namespace layer; the namespace is the handle's
/// [`LayerConfig::namespace`](crate::LayerConfig::namespace).
#[derive(Clone, Copy, Debug, Default)]
pub struct NamespaceLayer;

/// One handle's namespace, both ways.
#[derive(Clone)]
struct Ns(Prefix);

impl Ns {
    fn key(&self, key: &Key) -> Key {
        self.0.join(key)
    }

    fn prefix(&self, prefix: &Prefix) -> Prefix {
        self.0.join_prefix(prefix)
    }

    /// Maps a driver's key back to the caller's; `None` for keys outside
    /// the namespace or under the reserved root.
    fn outer(&self, key: &Key) -> Option<Key> {
        let outer = self.0.strip(key)?;
        (outer.as_str().split('/').next() != Some(RESERVED_ROOT)).then_some(outer)
    }

    fn pair(&self, mut kv: KvPair) -> Option<KvPair> {
        kv.key = self.outer(&kv.key)?;
        Some(kv)
    }

    fn event(&self, ev: Event) -> Option<Event> {
        match ev {
            Event::Put { kv, prev } => Some(Event::Put {
                kv: self.pair(kv)?,
                prev: prev.and_then(|p| self.pair(p)),
            }),
            Event::Delete { key, revision } => Some(Event::Delete {
                key: self.outer(&key)?,
                revision,
            }),
        }
    }

    fn target(&self, target: Target) -> Target {
        match target {
            Target::Key(k) => Target::Key(self.key(&k)),
            Target::Prefix(p) => Target::Prefix(self.prefix(&p)),
        }
    }

    /// A driver's watch as the caller sees it: events outside the
    /// namespace or under the reserved root dropped, keys made relative.
    fn watch(&self, stream: WatchStream) -> WatchStream {
        let ns = self.clone();
        // A plain function per item, not a future: a waiting stream
        // stores no pending item (see `stream_guard` on why a watch's size
        // matters).
        tokio_stream::StreamExt::filter_map(stream, move |item| match item {
            Ok(ev) => ns.event(ev).map(Ok),
            Err(e) => Some(Err(ns.error(e))),
        })
        .boxed()
    }

    fn error(&self, e: Error) -> Error {
        let ns = self.0.dir();
        let locks = format!("{RESERVED_ROOT}/locks/{ns}");
        e.map_key(|k| {
            k.strip_prefix(&locks)
                .or_else(|| k.strip_prefix(&ns))
                .unwrap_or(k)
                .to_owned()
        })
    }
}

/// A session's ephemeral keys, in the namespace.
struct NsSession {
    inner: Arc<dyn SessionBackend>,
    ns: Ns,
}

#[async_trait]
impl SessionBackend for NsSession {
    fn id(&self) -> String {
        self.inner.id()
    }

    async fn put(&self, key: &Key, value: Bytes, condition: Condition) -> Result<Version> {
        let inner = self.ns.key(key);
        let out = self.inner.put(&inner, value, condition).await;
        out.map_err(|e| self.ns.error(e))
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// Whether a key of the root namespace lies under the reserved root.
fn reserved(key: &str) -> bool {
    key.split('/').next() == Some(RESERVED_ROOT)
}

/// Sorted prefixes with every prefix covered by another dropped, so a driver
/// never reads a key twice.
fn disjoint(mut prefixes: Vec<Prefix>) -> Vec<Prefix> {
    prefixes.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    prefixes.dedup();
    let all = prefixes.clone();
    prefixes.retain(|p| !all.iter().any(|q| q != p && q.covers(p)));
    prefixes
}

#[async_trait]
impl Layer for NamespaceLayer {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
        self.around(req, next).await
    }
}

impl Standard for NamespaceLayer {
    async fn around<N: Inner>(&self, req: Request, next: N) -> Result<Response> {
        let namespace = &next.context().config().namespace;
        if namespace.is_root() {
            // The hot path: nothing to map for single-key reads and writes
            // but hiding the reserved root.
            match req {
                Request::Get { key } if !reserved(key.as_str()) => {
                    return next.run(Request::Get { key }).await;
                }
                req @ (Request::Put { .. } | Request::Delete { .. } | Request::Exists { .. }) => {
                    return next.run(req).await;
                }
                req => {
                    let ns = Ns(Prefix::root());
                    let out = ns.call(req, next).await;
                    return out.map_err(|e| ns.error(e));
                }
            }
        }
        let ns = Ns(namespace.clone());
        let out = ns.call(req, next).await;
        out.map_err(|e| ns.error(e))
    }
}

/// The namespace layer's mapping of a single-key `get`, `put`, `delete` or
/// `exists`, or of a `watch` (the fused fast path); any other request
/// comes back as `Err`.
pub(crate) fn simple(
    namespace: &Prefix,
    req: Request,
) -> std::result::Result<(Request, SimpleNs), Request> {
    if let Request::Watch { target, start } = req {
        // In the root namespace too: its events under the reserved root
        // are dropped.
        let ns = Ns(namespace.clone());
        let target = ns.target(target);
        return Ok((Request::Watch { target, start }, SimpleNs(Some(ns))));
    }
    if namespace.is_root() {
        // As the layer's hot path: nothing to map but hiding the reserved root.
        return match req {
            Request::Get { ref key } if reserved(key.as_str()) => Err(req),
            Request::Get { .. }
            | Request::Put { .. }
            | Request::Delete { .. }
            | Request::Exists { .. } => Ok((req, SimpleNs(None))),
            other => Err(other),
        };
    }
    let ns = Ns(namespace.clone());
    let req = match req {
        Request::Get { key } => Request::Get { key: ns.key(&key) },
        Request::Put { key, value, opts } => Request::Put {
            key: ns.key(&key),
            value,
            opts,
        },
        Request::Delete { key, condition } => Request::Delete {
            key: ns.key(&key),
            condition,
        },
        Request::Exists { key } => Request::Exists { key: ns.key(&key) },
        other => return Err(other),
    };
    Ok((req, SimpleNs(Some(ns))))
}

/// How [`simple`] maps the answer back.
pub(crate) struct SimpleNs(Option<Ns>);

impl SimpleNs {
    /// The caller's view of the driver's answer: pair and error keys
    /// relative to the namespace.
    pub(crate) fn answer(&self, out: Result<Response>) -> Result<Response> {
        let Some(ns) = &self.0 else {
            return out;
        };
        match out {
            Ok(Response::Get(p)) => Ok(Response::Get(p.and_then(|p| ns.pair(p)))),
            Ok(Response::Watch(s)) => Ok(Response::Watch(ns.watch(s))),
            Ok(other) => Ok(other),
            Err(e) => Err(ns.error(e)),
        }
    }
}

impl Ns {
    async fn call<N: Inner>(&self, req: Request, next: N) -> Result<Response> {
        let lock_key = |k: &Key| Key::lock_record(&self.0, k);
        let resp = match req {
            Request::Get { key } => match next
                .run(Request::Get {
                    key: self.key(&key),
                })
                .await?
            {
                Response::Get(p) => Response::Get(p.and_then(|p| self.pair(p))),
                other => other,
            },
            Request::Put { key, value, opts } => {
                let key = self.key(&key);
                next.run(Request::Put { key, value, opts }).await?
            }
            Request::Delete { key, condition } => {
                let key = self.key(&key);
                next.run(Request::Delete { key, condition }).await?
            }
            Request::Exists { key } => {
                next.run(Request::Exists {
                    key: self.key(&key),
                })
                .await?
            }
            Request::List { prefix } => {
                let prefix = self.prefix(&prefix);
                match next.run(Request::List { prefix }).await? {
                    Response::List(pairs) => {
                        Response::List(pairs.into_iter().filter_map(|p| self.pair(p)).collect())
                    }
                    other => other,
                }
            }
            Request::Keys { prefix } => {
                let prefix = self.prefix(&prefix);
                let root = prefix.is_root();
                match next.run(Request::Keys { prefix }).await? {
                    Response::Keys(mut names) if root => {
                        names.retain(|n| n != RESERVED_ROOT);
                        Response::Keys(names)
                    }
                    other => other,
                }
            }
            Request::DeletePrefix { prefix } => {
                let prefix = self.prefix(&prefix);
                if prefix.is_root() {
                    Response::DeletePrefix(self.delete_all(next).await?)
                } else {
                    next.run(Request::DeletePrefix { prefix }).await?
                }
            }
            Request::Watch { target, start } => {
                let target = self.target(target);
                match next.run(Request::Watch { target, start }).await? {
                    Response::Watch(s) => Response::Watch(self.watch(s)),
                    other => other,
                }
            }
            Request::Lock { key, opts } => {
                let req = Request::Lock {
                    key: lock_key(&key),
                    opts,
                };
                match next.run(req).await? {
                    Response::Lock(g) => Response::Lock(g.with_key(key)),
                    other => other,
                }
            }
            Request::TryLock { key, opts } => {
                let req = Request::TryLock {
                    key: lock_key(&key),
                    opts,
                };
                match next.run(req).await? {
                    Response::TryLock(g) => Response::TryLock(g.map(|g| g.with_key(key))),
                    other => other,
                }
            }
            Request::LockHolder { key } => {
                next.run(Request::LockHolder {
                    key: lock_key(&key),
                })
                .await?
            }
            Request::Session { opts } => match next.run(Request::Session { opts }).await? {
                Response::Session(session) => {
                    let ns = self.clone();
                    Response::Session(
                        session.map_backend(|inner| Arc::new(NsSession { inner, ns })),
                    )
                }
                other => other,
            },
            Request::Atomic { checks, ops } => {
                let checks = checks
                    .into_iter()
                    .map(|c| match c {
                        Check::Exists(k) => Check::Exists(self.key(&k)),
                        Check::Absent(k) => Check::Absent(self.key(&k)),
                        Check::Version(k, v) => Check::Version(self.key(&k), v),
                        Check::Value(k, v) => Check::Value(self.key(&k), v),
                    })
                    .collect();
                let ops = ops
                    .into_iter()
                    .map(|o| match o {
                        Op::Put(k, v) => Op::Put(self.key(&k), v),
                        Op::Delete(k) => Op::Delete(self.key(&k)),
                    })
                    .collect();
                next.run(Request::Atomic { checks, ops }).await?
            }
            Request::Snapshot { prefixes } => {
                let prefixes = disjoint(prefixes.iter().map(|p| self.prefix(p)).collect());
                match next.run(Request::Snapshot { prefixes }).await? {
                    Response::Snapshot(snap) => {
                        let mut pairs: Vec<KvPair> = snap
                            .pairs
                            .into_iter()
                            .filter_map(|p| self.pair(p))
                            .collect();
                        pairs.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
                        pairs.dedup_by(|a, b| a.key == b.key);
                        Response::Snapshot(Snapshot {
                            revision: snap.revision,
                            pairs,
                        })
                    }
                    other => other,
                }
            }
            Request::Export { prefix } => {
                let prefix = self.prefix(&prefix);
                match next.run(Request::Export { prefix }).await? {
                    Response::Export(s) => {
                        let ns = self.clone();
                        Response::Export(
                            s.filter_map(move |item| {
                                futures::future::ready(match item {
                                    Ok(p) => ns.pair(p).map(Ok),
                                    Err(e) => Some(Err(ns.error(e))),
                                })
                            })
                            .boxed(),
                        )
                    }
                    other => other,
                }
            }
            Request::Import { pairs } => {
                let ns = self.clone();
                let pairs = pairs.map(move |s| {
                    s.map_ok(move |mut p| {
                        p.key = ns.key(&p.key);
                        p
                    })
                    .boxed()
                });
                next.run(Request::Import { pairs }).await?
            }
            req @ (Request::Compact { .. } | Request::Probe | Request::Close) => {
                next.run(req).await?
            }
        };
        Ok(resp)
    }

    /// `delete_prefix` of the whole backend: deletes each top-level name but
    /// the reserved one, sparing anykv's own records (held locks).
    async fn delete_all<N: Inner>(&self, next: N) -> Result<u64> {
        let names = match next
            .run(Request::Keys {
                prefix: Prefix::root(),
            })
            .await?
        {
            Response::Keys(names) => names,
            other => return Err(unexpected(next, &other)),
        };
        let mut total = 0;
        for name in names.into_iter().filter(|n| n != RESERVED_ROOT) {
            let Ok(top) = Prefix::new(name) else { continue };
            let Ok(key) = Key::new(top.as_str()) else {
                continue;
            };
            match next.run(Request::DeletePrefix { prefix: top }).await? {
                Response::DeletePrefix(n) => total += n,
                other => return Err(unexpected(next, &other)),
            }
            let req = Request::Delete {
                key,
                condition: Condition::Always,
            };
            match next.run(req).await? {
                Response::Delete(true) => total += 1,
                Response::Delete(false) => {}
                other => return Err(unexpected(next, &other)),
            }
        }
        Ok(total)
    }
}

fn unexpected<N: Inner>(next: N, got: &Response) -> Error {
    Error::Backend {
        backend: next.context().backend(),
        message: format!("a layer answered with a {} response", got.kind()),
        source: None,
    }
}
