//! What a backend can do, declared once by each driver.
//!
//! The layers reject an operation a driver does not declare with
//! [`Error::Unsupported`](crate::Error::Unsupported) before it reaches the
//! driver, and the conformance suite checks both sides of each declaration.

use std::time::Duration;

/// How a backend's watch recovers after a gap (reconnect, compaction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchHistory {
    /// The backend keeps history: a watch resumes from any retained revision
    /// and replays every event exactly once.
    Full,
    /// No history to resume from: after a gap the driver re-reads the watched
    /// range and emits the differences, so the consumer's view converges, but
    /// intermediate values and some deletes' exact revisions may be missed.
    Converge,
}

/// How [`Store::snapshot`](crate::Store::snapshot) reads several prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMode {
    /// One read at one store revision (etcd ranges pinned to a revision, a
    /// Consul read transaction, one redb read transaction, one lock in
    /// memory): the pairs are exactly the committed state at `revision`.
    Atomic,
    /// The backend has no multi-key read at one point in time; the driver
    /// reads the range twice and accepts the read only when the second pass
    /// finds every node unchanged (ZooKeeper: same `mzxid` for each node and
    /// same `pzxid` for each parent). Every value was then current over a
    /// common interval, so the pairs are the state at one instant between the
    /// passes; `revision` is the highest zxid seen, and a watch from it sees
    /// every later change. Under constant writes the driver retries and may
    /// fail with `Unavailable` after its attempts run out.
    Verified,
}

/// A backend's capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Largest value accepted, in bytes.
    pub max_value_size: usize,
    /// `Some(granularity)`: keys with a TTL disappear at most this long after
    /// the TTL runs out. `None`: TTLs are unsupported.
    pub ttl: Option<Duration>,
    /// How watches recover.
    pub watch_history: WatchHistory,
    /// Whether `lock` / `try_lock` / `lock_holder` are available.
    pub locks: bool,
    /// Whether locks exclude holders in other processes (false: within one process).
    pub cross_process_locks: bool,
    /// Most operations (checks + writes) in one `atomic` call, if bounded.
    pub max_atomic_ops: Option<usize>,
    /// Whether data survives a restart of the process.
    pub durable: bool,
    /// How `snapshot` reads; `None`: unsupported.
    pub snapshot: Option<SnapshotMode>,
    /// Whether `compact` discards history (watches from before it then get
    /// `Compacted`).
    pub compact: bool,
    /// `Some(granularity)`: sessions are supported, and a dead session's
    /// ephemeral keys disappear at most `ttl + granularity` after its last
    /// renewal. `None`: `session` (and elections) are unsupported.
    pub sessions: Option<Duration>,
    /// Whether sessions (and elections) span processes (false: within one
    /// process; the keys are still visible to all).
    pub cross_process_sessions: bool,
}

impl Capabilities {
    /// Capabilities of a driver that can do the basics, for builders:
    /// override what your backend lacks, and declare the optional operations
    /// it implements (`snapshot`, `compact` start undeclared).
    ///
    /// ```
    /// use anykv_core::{Capabilities, WatchHistory};
    /// let caps = Capabilities::full(1 << 20).with_ttl(None).with_watch(WatchHistory::Converge);
    /// assert!(caps.ttl.is_none());
    /// ```
    pub const fn full(max_value_size: usize) -> Self {
        Capabilities {
            max_value_size,
            ttl: Some(Duration::from_millis(100)),
            watch_history: WatchHistory::Full,
            locks: true,
            cross_process_locks: false,
            max_atomic_ops: None,
            durable: false,
            snapshot: None,
            compact: false,
            sessions: None,
            cross_process_sessions: false,
        }
    }

    /// Sets the TTL granularity (`None`: unsupported).
    pub const fn with_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the watch recovery mode.
    pub const fn with_watch(mut self, w: WatchHistory) -> Self {
        self.watch_history = w;
        self
    }

    /// Sets lock support (`cross_process`: whether it holds across processes).
    pub const fn with_locks(mut self, locks: bool, cross_process: bool) -> Self {
        self.locks = locks;
        self.cross_process_locks = cross_process;
        self
    }

    /// Bounds `atomic`.
    pub const fn with_max_atomic_ops(mut self, max: Option<usize>) -> Self {
        self.max_atomic_ops = max;
        self
    }

    /// Declares `snapshot` support and how it reads (`None`: unsupported).
    pub const fn with_snapshot(mut self, mode: Option<SnapshotMode>) -> Self {
        self.snapshot = mode;
        self
    }

    /// Declares `compact` support.
    pub const fn with_compact(mut self, compact: bool) -> Self {
        self.compact = compact;
        self
    }

    /// Declares session support: the granularity past a session's TTL
    /// (`None`: unsupported) and whether sessions span processes.
    pub const fn with_sessions(
        mut self,
        granularity: Option<Duration>,
        cross_process: bool,
    ) -> Self {
        self.sessions = granularity;
        self.cross_process_sessions = cross_process;
        self
    }

    /// Sets durability.
    pub const fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
}
