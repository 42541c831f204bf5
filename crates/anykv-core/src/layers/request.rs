//! Every [`Store`] call as one value: what a [`Layer`](crate::Layer) sees.
//!
//! [`Kv`](crate::Kv) turns each call into a [`Request`], runs it through its
//! layers and unpacks the [`Response`]. A layer intercepts every operation
//! through one method, so it cannot forget one; it matches on
//! [`Request::kind`] to treat some operations apart.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::{
    error::{Error, Result},
    key::{Key, Prefix},
    lock::LockGuard,
    session::{Session, SessionOptions},
    store::{PairStream, Store, WatchStream},
    types::{
        Check, Condition, KvPair, LockInfo, LockOptions, Op, PutOptions, Revision, Snapshot, Start,
        Target, Version,
    },
};

/// Which operation a [`Request`] is: one per [`Store`] method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// [`Store::get`]
    Get,
    /// [`Store::put`]
    Put,
    /// [`Store::delete`]
    Delete,
    /// [`Store::exists`]
    Exists,
    /// [`Store::list`]
    List,
    /// [`Store::keys`]
    Keys,
    /// [`Store::delete_prefix`]
    DeletePrefix,
    /// [`Store::watch`]
    Watch,
    /// [`Store::lock`]
    Lock,
    /// [`Store::try_lock`]
    TryLock,
    /// [`Store::lock_holder`]
    LockHolder,
    /// [`Store::session`]
    Session,
    /// [`Store::atomic`]
    Atomic,
    /// [`Store::snapshot`]
    Snapshot,
    /// [`Store::compact`]
    Compact,
    /// [`Store::export`]
    Export,
    /// [`Store::import`]
    Import,
    /// [`Store::probe`]
    Probe,
    /// [`Store::close`]
    Close,
}

impl OpKind {
    /// Every operation, in [`Store`] order.
    pub const ALL: &'static [OpKind] = &[
        OpKind::Get,
        OpKind::Put,
        OpKind::Delete,
        OpKind::Exists,
        OpKind::List,
        OpKind::Keys,
        OpKind::DeletePrefix,
        OpKind::Watch,
        OpKind::Lock,
        OpKind::TryLock,
        OpKind::LockHolder,
        OpKind::Session,
        OpKind::Atomic,
        OpKind::Snapshot,
        OpKind::Compact,
        OpKind::Export,
        OpKind::Import,
        OpKind::Probe,
        OpKind::Close,
    ];

    /// The [`Store`] method's name (`"delete_prefix"`), used in traces,
    /// metrics labels and errors.
    pub const fn name(self) -> &'static str {
        match self {
            OpKind::Get => "get",
            OpKind::Put => "put",
            OpKind::Delete => "delete",
            OpKind::Exists => "exists",
            OpKind::List => "list",
            OpKind::Keys => "keys",
            OpKind::DeletePrefix => "delete_prefix",
            OpKind::Watch => "watch",
            OpKind::Lock => "lock",
            OpKind::TryLock => "try_lock",
            OpKind::LockHolder => "lock_holder",
            OpKind::Session => "session",
            OpKind::Atomic => "atomic",
            OpKind::Snapshot => "snapshot",
            OpKind::Compact => "compact",
            OpKind::Export => "export",
            OpKind::Import => "import",
            OpKind::Probe => "probe",
            OpKind::Close => "close",
        }
    }

    /// Whether running it twice is the same as once, so that the retry
    /// layer may repeat it after any retryable error. Writes are not (even
    /// an unconditional put would write a second version and event); they
    /// are retried only when the error proves the request never reached the
    /// server.
    pub const fn is_idempotent(self) -> bool {
        matches!(
            self,
            OpKind::Get
                | OpKind::Exists
                | OpKind::List
                | OpKind::Keys
                | OpKind::Watch
                | OpKind::LockHolder
                | OpKind::Snapshot
                | OpKind::Compact
                | OpKind::Export
        )
    }
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The stream of an [`Request::Import`], taken once by whichever attempt
/// runs first (a consumed stream cannot be replayed, so a retried import
/// fails with `InvalidArgument`).
#[derive(Clone)]
pub struct ImportPairs(Arc<Mutex<Option<PairStream>>>);

impl ImportPairs {
    /// Wraps a stream.
    pub fn new(pairs: PairStream) -> Self {
        ImportPairs(Arc::new(Mutex::new(Some(pairs))))
    }

    /// The stream, unless an earlier attempt took it.
    pub fn take(&self) -> Option<PairStream> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Replaces the stream by `f(stream)` (a layer mapping or checking pairs).
    pub fn map(self, f: impl FnOnce(PairStream) -> PairStream) -> Self {
        match self.take() {
            Some(s) => ImportPairs::new(f(s)),
            None => self,
        }
    }
}

impl std::fmt::Debug for ImportPairs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImportPairs")
    }
}

/// One [`Store`] call with its arguments.
#[derive(Clone, Debug)]
#[allow(missing_docs)] // the fields are the Store method's arguments
pub enum Request {
    Get {
        key: Key,
    },
    Put {
        key: Key,
        value: Bytes,
        opts: PutOptions,
    },
    Delete {
        key: Key,
        condition: Condition,
    },
    Exists {
        key: Key,
    },
    List {
        prefix: Prefix,
    },
    Keys {
        prefix: Prefix,
    },
    DeletePrefix {
        prefix: Prefix,
    },
    Watch {
        target: Target,
        start: Start,
    },
    Lock {
        key: Key,
        opts: LockOptions,
    },
    TryLock {
        key: Key,
        opts: LockOptions,
    },
    LockHolder {
        key: Key,
    },
    Session {
        opts: SessionOptions,
    },
    Atomic {
        checks: Vec<Check>,
        ops: Vec<Op>,
    },
    Snapshot {
        prefixes: Vec<Prefix>,
    },
    Compact {
        revision: Revision,
    },
    Export {
        prefix: Prefix,
    },
    Import {
        pairs: ImportPairs,
    },
    Probe,
    Close,
}

impl Request {
    /// Which operation this is.
    pub fn kind(&self) -> OpKind {
        match self {
            Request::Get { .. } => OpKind::Get,
            Request::Put { .. } => OpKind::Put,
            Request::Delete { .. } => OpKind::Delete,
            Request::Exists { .. } => OpKind::Exists,
            Request::List { .. } => OpKind::List,
            Request::Keys { .. } => OpKind::Keys,
            Request::DeletePrefix { .. } => OpKind::DeletePrefix,
            Request::Watch { .. } => OpKind::Watch,
            Request::Lock { .. } => OpKind::Lock,
            Request::TryLock { .. } => OpKind::TryLock,
            Request::LockHolder { .. } => OpKind::LockHolder,
            Request::Session { .. } => OpKind::Session,
            Request::Atomic { .. } => OpKind::Atomic,
            Request::Snapshot { .. } => OpKind::Snapshot,
            Request::Compact { .. } => OpKind::Compact,
            Request::Export { .. } => OpKind::Export,
            Request::Import { .. } => OpKind::Import,
            Request::Probe => OpKind::Probe,
            Request::Close => OpKind::Close,
        }
    }

    /// The operation's name, e.g. `"get"`.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// See [`OpKind::is_idempotent`].
    pub fn is_idempotent(&self) -> bool {
        self.kind().is_idempotent()
    }

    /// The key or prefix the request is about, if it has one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Request::Get { key }
            | Request::Put { key, .. }
            | Request::Delete { key, .. }
            | Request::Exists { key }
            | Request::Lock { key, .. }
            | Request::TryLock { key, .. }
            | Request::LockHolder { key } => Some(key.as_str()),
            Request::List { prefix }
            | Request::Keys { prefix }
            | Request::DeletePrefix { prefix }
            | Request::Export { prefix } => Some(prefix.as_str()),
            Request::Watch { target, .. } => Some(match target {
                Target::Key(k) => k.as_str(),
                Target::Prefix(p) => p.as_str(),
            }),
            Request::Snapshot { prefixes } => prefixes.first().map(Prefix::as_str),
            Request::Atomic { .. }
            | Request::Session { .. }
            | Request::Compact { .. }
            | Request::Import { .. }
            | Request::Probe
            | Request::Close => None,
        }
    }

    /// Runs the request on a store: the bottom of every stack.
    pub async fn run_on(self, store: &dyn Store) -> Result<Response> {
        Ok(match self {
            Request::Get { key } => Response::Get(store.get(&key).await?),
            Request::Put { key, value, opts } => Response::Put(store.put(&key, value, opts).await?),
            Request::Delete { key, condition } => {
                Response::Delete(store.delete(&key, condition).await?)
            }
            Request::Exists { key } => Response::Exists(store.exists(&key).await?),
            Request::List { prefix } => Response::List(store.list(&prefix).await?),
            Request::Keys { prefix } => Response::Keys(store.keys(&prefix).await?),
            Request::DeletePrefix { prefix } => {
                Response::DeletePrefix(store.delete_prefix(&prefix).await?)
            }
            Request::Watch { target, start } => Response::Watch(store.watch(target, start).await?),
            Request::Lock { key, opts } => Response::Lock(store.lock(&key, opts).await?),
            Request::TryLock { key, opts } => Response::TryLock(store.try_lock(&key, opts).await?),
            Request::LockHolder { key } => Response::LockHolder(store.lock_holder(&key).await?),
            Request::Session { opts } => Response::Session(store.session(opts).await?),
            Request::Atomic { checks, ops } => Response::Atomic(store.atomic(checks, ops).await?),
            Request::Snapshot { prefixes } => Response::Snapshot(store.snapshot(&prefixes).await?),
            Request::Compact { revision } => {
                store.compact(revision).await?;
                Response::Compact
            }
            Request::Export { prefix } => Response::Export(store.export(&prefix).await?),
            Request::Import { pairs } => match pairs.take() {
                Some(s) => Response::Import(store.import(s).await?),
                None => {
                    return Err(Error::InvalidArgument {
                        backend: store.backend(),
                        message: "import stream already consumed".into(),
                    });
                }
            },
            Request::Probe => {
                store.probe().await?;
                Response::Probe
            }
            Request::Close => {
                store.close().await?;
                Response::Close
            }
        })
    }
}

/// What a [`Request`] answers, one variant per operation.
#[allow(missing_docs)] // each variant holds the Store method's return value
pub enum Response {
    Get(Option<KvPair>),
    Put(Version),
    Delete(bool),
    Exists(bool),
    List(Vec<KvPair>),
    Keys(Vec<String>),
    DeletePrefix(u64),
    Watch(WatchStream),
    Lock(LockGuard),
    TryLock(Option<LockGuard>),
    LockHolder(Option<LockInfo>),
    Session(Session),
    Atomic(Revision),
    Snapshot(Snapshot),
    Compact,
    Export(PairStream),
    Import(u64),
    Probe,
    Close,
}

impl Response {
    /// Which operation this answers.
    pub fn kind(&self) -> OpKind {
        match self {
            Response::Get(_) => OpKind::Get,
            Response::Put(_) => OpKind::Put,
            Response::Delete(_) => OpKind::Delete,
            Response::Exists(_) => OpKind::Exists,
            Response::List(_) => OpKind::List,
            Response::Keys(_) => OpKind::Keys,
            Response::DeletePrefix(_) => OpKind::DeletePrefix,
            Response::Watch(_) => OpKind::Watch,
            Response::Lock(_) => OpKind::Lock,
            Response::TryLock(_) => OpKind::TryLock,
            Response::LockHolder(_) => OpKind::LockHolder,
            Response::Session(_) => OpKind::Session,
            Response::Atomic(_) => OpKind::Atomic,
            Response::Snapshot(_) => OpKind::Snapshot,
            Response::Compact => OpKind::Compact,
            Response::Export(_) => OpKind::Export,
            Response::Import(_) => OpKind::Import,
            Response::Probe => OpKind::Probe,
            Response::Close => OpKind::Close,
        }
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Response::{:?}", self.kind())
    }
}
