//! Values that cross the [`Store`](crate::Store) API: pairs, versions,
//! conditions, watch events, transactions and lock options.

use std::{fmt, time::Duration};

use bytes::Bytes;

use crate::key::{Key, Prefix};

/// A store-wide revision: monotonic, used to order events and resume watches.
pub type Revision = u64;

/// An opaque per-key version token.
///
/// It changes on every write of the key and is never reused for that key,
/// even after delete and re-create (no ABA). Compare versions for equality
/// only; their numeric order means nothing across backends.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(u64);

impl Version {
    /// Wraps a backend's token.
    pub const fn new(raw: u64) -> Self {
        Version(raw)
    }

    /// The backend's token.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl std::str::FromStr for Version {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Version)
    }
}

/// A key with its value and versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvPair {
    /// The key (without the store's namespace).
    pub key: Key,
    /// The value.
    pub value: Bytes,
    /// Per-key version token; see [`Version`].
    pub version: Version,
    /// Store revision at which this incarnation of the key was created.
    pub create_revision: Revision,
    /// Store revision of the last write of the key.
    pub mod_revision: Revision,
}

/// Pairs of one or more prefixes read at one revision, as returned by
/// [`Store::snapshot`](crate::Store::snapshot).
///
/// `watch(target, Start::After(snapshot.revision))` then delivers the changes
/// made after the snapshot: on [`Full`](crate::WatchHistory::Full) backends
/// every one, once; on [`Converge`](crate::WatchHistory::Converge) backends
/// the keys changed since (keys deleted between the snapshot and the watch's
/// start are not reported; a [`Mirror`](crate::Mirror) covers that case).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The store revision the pairs were read at.
    pub revision: Revision,
    /// The pairs of every prefix, sorted by key, each key once.
    pub pairs: Vec<KvPair>,
}

/// Precondition of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Condition {
    /// No precondition.
    #[default]
    Always,
    /// The key must not exist ([`Error::AlreadyExists`](crate::Error::AlreadyExists) otherwise).
    IfAbsent,
    /// The key must exist ([`Error::NotFound`](crate::Error::NotFound) otherwise).
    IfPresent,
    /// The key must be at exactly this version
    /// ([`Error::Conflict`](crate::Error::Conflict), or `NotFound` if absent).
    IfVersion(Version),
}

/// Options of [`Store::put`](crate::Store::put).
///
/// ```
/// use anykv_core::{PutOptions, Condition};
/// use std::time::Duration;
/// let opts = PutOptions::if_absent().with_ttl(Duration::from_secs(30));
/// assert_eq!(opts.condition, Condition::IfAbsent);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PutOptions {
    /// Precondition.
    pub condition: Condition,
    /// The key disappears this long after the write (see `Capabilities::ttl`).
    pub ttl: Option<Duration>,
}

impl PutOptions {
    /// Create-only.
    pub fn if_absent() -> Self {
        PutOptions {
            condition: Condition::IfAbsent,
            ttl: None,
        }
    }

    /// Update-only.
    pub fn if_present() -> Self {
        PutOptions {
            condition: Condition::IfPresent,
            ttl: None,
        }
    }

    /// Compare-and-swap on `version`.
    pub fn if_version(version: Version) -> Self {
        PutOptions {
            condition: Condition::IfVersion(version),
            ttl: None,
        }
    }

    /// Adds a time to live.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// What a watch follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One key.
    Key(Key),
    /// Every key strictly below a prefix (the root prefix: the whole namespace).
    Prefix(Prefix),
}

impl Target {
    /// True when `key` is watched by this target.
    pub fn matches(&self, key: &Key) -> bool {
        match self {
            Target::Key(k) => k == key,
            Target::Prefix(p) => p.contains(key.as_str()),
        }
    }
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Start {
    /// Only changes made after the watch is established.
    #[default]
    Now,
    /// Every change with a revision strictly greater than this one.
    After(Revision),
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A key was created or updated.
    Put {
        /// The new pair.
        kv: KvPair,
        /// The previous pair, where the backend knows it.
        prev: Option<KvPair>,
    },
    /// A key was deleted (explicitly, by prefix, or by TTL expiry).
    Delete {
        /// The key.
        key: Key,
        /// The revision of the delete.
        revision: Revision,
    },
}

impl Event {
    /// The key the event is about.
    pub fn key(&self) -> &Key {
        match self {
            Event::Put { kv, .. } => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put { kv, .. } => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// A precondition of [`Store::atomic`](crate::Store::atomic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The key exists.
    Exists(Key),
    /// The key does not exist.
    Absent(Key),
    /// The key exists at this version.
    Version(Key, Version),
    /// The key exists with this value.
    Value(Key, Bytes),
}

impl Check {
    /// The key checked.
    pub fn key(&self) -> &Key {
        match self {
            Check::Exists(k) | Check::Absent(k) | Check::Version(k, _) | Check::Value(k, _) => k,
        }
    }

    /// Evaluates the check against the key's current state (for drivers that
    /// evaluate checks themselves).
    pub fn holds(&self, current: Option<(&Bytes, Version)>) -> bool {
        match (self, current) {
            (Check::Exists(_), c) => c.is_some(),
            (Check::Absent(_), c) => c.is_none(),
            (Check::Version(_, v), Some((_, cur))) => *v == cur,
            (Check::Value(_, v), Some((cur, _))) => v == cur,
            (Check::Version(..) | Check::Value(..), None) => false,
        }
    }
}

/// A write of [`Store::atomic`](crate::Store::atomic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write a value (no TTL inside transactions).
    Put(Key, Bytes),
    /// Delete a key (absent keys are fine).
    Delete(Key),
}

impl Op {
    /// The key written.
    pub fn key(&self) -> &Key {
        match self {
            Op::Put(k, _) | Op::Delete(k) => k,
        }
    }
}

/// Options of [`Store::lock`](crate::Store::lock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockOptions {
    /// Lease length: if the holder dies, the lock frees itself after this.
    /// The guard renews it while held.
    pub ttl: Duration,
    /// How long to wait for the lock; `None` waits forever.
    /// Running out is [`Error::Timeout`](crate::Error::Timeout).
    pub wait: Option<Duration>,
    /// A name for the holder, shown by `lock_holder`.
    pub owner: Option<String>,
    /// The longest the lock may be held (kvdb's `LockWithTimeout`): past it
    /// the guard's `lost()` fires and the lock is released, so a stuck
    /// holder cannot block the others forever. `None`: no bound.
    pub max_hold: Option<Duration>,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: Duration::from_secs(15),
            wait: None,
            owner: None,
            max_hold: None,
        }
    }
}

impl LockOptions {
    /// Bounds how long the lock may be held; see [`LockOptions::max_hold`].
    pub fn with_max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = Some(max_hold);
        self
    }
}

/// Who holds a lock, from [`Store::lock_holder`](crate::Store::lock_holder).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    /// The holder's fencing token.
    pub fencing_token: u64,
    /// The holder's name, if it gave one.
    pub owner: Option<String>,
}
