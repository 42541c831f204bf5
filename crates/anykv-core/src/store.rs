//! The [`Store`] trait: the small contract every driver implements.

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};

use crate::{
    capability::Capabilities,
    error::{Error, Result},
    key::{Key, Prefix},
    lock::LockGuard,
    session::{Session, SessionOptions},
    types::{
        Check, Condition, Event, KvPair, LockInfo, LockOptions, Op, PutOptions, Revision, Snapshot,
        Start, Target, Version,
    },
};

/// A stream of watch events; an error item is delivered as `Err`, never as a
/// silently closed stream. Dropping it cancels the watch.
pub type WatchStream = BoxStream<'static, Result<Event>>;

/// A stream of pairs, as produced by [`Store::export`] and taken by [`Store::import`].
pub type PairStream = BoxStream<'static, Result<KvPair>>;

/// One async key-value API over every backend.
///
/// Drivers implement this trait for their backend with full keys (the
/// namespace already applied) and the layers in [`Kv`](crate::Kv) add
/// namespacing, capability checks, timeouts, retries, liveness and tracing
/// around it, the same way for every driver. Methods with a default body are
/// optional: the default either derives the operation from required ones or
/// returns [`Error::Unsupported`]; declare the matching [`Capabilities`].
///
/// Keys and prefixes arrive validated ([`Key`], [`Prefix`]); values arrive
/// within `max_value_size`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Backend name, e.g. `"etcd"`.
    fn backend(&self) -> &'static str;

    /// What this backend can do.
    fn capabilities(&self) -> &Capabilities;

    /// Reads a key; `Ok(None)` if it does not exist.
    async fn get(&self, key: &Key) -> Result<Option<KvPair>>;

    /// Writes a key under `opts.condition`, returning the new version.
    ///
    /// A failed condition is `AlreadyExists` (IfAbsent), `NotFound` (IfPresent,
    /// or IfVersion on an absent key) or `Conflict` (IfVersion).
    async fn put(&self, key: &Key, value: Bytes, opts: PutOptions) -> Result<Version>;

    /// Deletes a key. `Condition::Always` returns whether the key existed;
    /// `IfPresent`/`IfVersion` fail with `NotFound`/`Conflict` instead of
    /// returning false. `IfAbsent` is an `InvalidArgument`.
    async fn delete(&self, key: &Key, condition: Condition) -> Result<bool>;

    /// Whether a key exists.
    async fn exists(&self, key: &Key) -> Result<bool> {
        Ok(self.get(key).await?.is_some())
    }

    /// Every key strictly below `prefix`, sorted by key bytes.
    async fn list(&self, prefix: &Prefix) -> Result<Vec<KvPair>>;

    /// The distinct names one level below `prefix`, sorted.
    async fn keys(&self, prefix: &Prefix) -> Result<Vec<String>> {
        // Not adjacent in key order: `a`, `a-x`, `a/b` name `a` twice.
        let names: std::collections::BTreeSet<String> = self
            .list(prefix)
            .await?
            .iter()
            .filter_map(|kv| prefix.child_name(kv.key.as_str()).map(str::to_owned))
            .collect();
        Ok(names.into_iter().collect())
    }

    /// Deletes every key strictly below `prefix`; returns how many.
    async fn delete_prefix(&self, prefix: &Prefix) -> Result<u64>;

    /// Follows changes of a key or prefix from `start`.
    async fn watch(&self, target: Target, start: Start) -> Result<WatchStream> {
        let _ = (target, start);
        Err(self.unsupported("watch"))
    }

    /// Takes a lock, waiting up to `opts.wait` (`Error::Timeout` after).
    async fn lock(&self, key: &Key, opts: LockOptions) -> Result<LockGuard> {
        let _ = (key, opts);
        Err(self.unsupported("lock"))
    }

    /// Takes a lock if it is free right now; `Ok(None)` if it is held.
    async fn try_lock(&self, key: &Key, opts: LockOptions) -> Result<Option<LockGuard>> {
        let _ = (key, opts);
        Err(self.unsupported("try_lock"))
    }

    /// Who holds a lock, if anyone.
    async fn lock_holder(&self, key: &Key) -> Result<Option<LockInfo>> {
        let _ = key;
        Err(self.unsupported("lock_holder"))
    }

    /// Starts a session: one lease kept alive in the background, under which
    /// [`Session::put`] writes ephemeral keys. Declare
    /// [`Capabilities::sessions`].
    async fn session(&self, opts: SessionOptions) -> Result<Session> {
        let _ = opts;
        Err(self.unsupported("session"))
    }

    /// Applies every op if every check holds, atomically; else nothing and
    /// `Error::Conflict` naming a failed check's key. Returns the revision.
    async fn atomic(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<Revision> {
        let _ = (checks, ops);
        Err(self.unsupported("atomic"))
    }

    /// Reads every pair below each of `prefixes` at one revision.
    ///
    /// Drivers receive the prefixes non-empty, sorted and disjoint (the
    /// layer drops a prefix covered by another) and may return the pairs in
    /// any order; the layer sorts them. Declare how the read is consistent
    /// in [`Capabilities::snapshot`].
    async fn snapshot(&self, prefixes: &[Prefix]) -> Result<Snapshot> {
        let _ = prefixes;
        Err(self.unsupported("snapshot"))
    }

    /// Discards the history up to `revision`: a watch from an earlier
    /// revision then fails with `Compacted`. Compacting at or below an
    /// already compacted revision is a no-op. Declare it in
    /// [`Capabilities::compact`].
    async fn compact(&self, revision: Revision) -> Result<()> {
        let _ = revision;
        Err(self.unsupported("compact"))
    }

    /// Streams every pair below `prefix`, sorted. TTLs are not carried.
    async fn export(&self, prefix: &Prefix) -> Result<PairStream> {
        let pairs = self.list(prefix).await?;
        Ok(futures::stream::iter(pairs.into_iter().map(Ok)).boxed())
    }

    /// Writes every pair of the stream (versions are ignored); returns how many.
    /// Stops at the first error, leaving what was written before it.
    async fn import(&self, mut pairs: PairStream) -> Result<u64> {
        let mut n = 0;
        while let Some(kv) = pairs.next().await {
            let kv = kv?;
            self.put(&kv.key, kv.value, PutOptions::default()).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Checks the connection: a cheap round trip.
    async fn probe(&self) -> Result<()>;

    /// Releases connections and background tasks.
    async fn close(&self) -> Result<()> {
        Ok(())
    }

    /// The `Unsupported` error for `operation` on this backend.
    fn unsupported(&self, operation: &'static str) -> Error {
        Error::Unsupported {
            backend: self.backend(),
            operation,
        }
    }
}

/// Standard outcomes of a failed write condition, for drivers.
pub mod condition {
    use super::*;

    /// The error for `condition` given the key's current version
    /// (`None`: absent), or `Ok(())` if the condition holds.
    pub fn check(
        backend: &'static str,
        key: &Key,
        condition: Condition,
        current: Option<Version>,
    ) -> Result<()> {
        match (condition, current) {
            (Condition::Always, _) => Ok(()),
            (Condition::IfAbsent, None) | (Condition::IfPresent, Some(_)) => Ok(()),
            (Condition::IfAbsent, Some(_)) => Err(Error::AlreadyExists {
                backend,
                key: key.to_string(),
            }),
            (Condition::IfPresent | Condition::IfVersion(_), None) => Err(Error::NotFound {
                backend,
                key: key.to_string(),
            }),
            (Condition::IfVersion(want), Some(have)) if want == have => Ok(()),
            (Condition::IfVersion(want), Some(have)) => Err(Error::Conflict {
                backend,
                key: key.to_string(),
                expected: Some(want),
                actual: Some(have),
            }),
        }
    }

    /// The `Conflict` error for a failed `atomic` check.
    pub fn failed_check(backend: &'static str, check: &Check) -> Error {
        Error::Conflict {
            backend,
            key: check.key().to_string(),
            expected: match check {
                Check::Version(_, v) => Some(*v),
                _ => None,
            },
            actual: None,
        }
    }
}
