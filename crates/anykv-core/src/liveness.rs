//! Liveness monitor, after the voltha `db.Backend` liveness channel.
//!
//! Every operation's outcome feeds [`LivenessMonitor::record`]; consumers
//! [`subscribe`](LivenessMonitor::subscribe) to a stream of states. Posting
//! never waits for subscribers: a slow one just sees the latest state.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::Stream;
use tokio::{
    sync::{Notify, futures::OwnedNotified, watch},
    time::Instant,
};
use tokio_stream::wrappers::WatchStream;

use crate::error::{Error, Result};

/// Default period after which an unchanged state is posted again.
pub const DEFAULT_LIVENESS_INTERVAL: Duration = Duration::from_secs(30);

/// Tracks whether a backend is reachable, from the outcome of operations and probes.
///
/// ```
/// use anykv_core::{LivenessMonitor, Error};
/// use futures::StreamExt;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let m = LivenessMonitor::new(std::time::Duration::from_secs(30));
/// let mut states = m.subscribe();
/// assert_eq!(states.next().await, Some(false)); // not alive until proven
/// m.record::<()>(&Ok(()));
/// assert_eq!(states.next().await, Some(true));
/// # }
/// ```
#[derive(Debug)]
pub struct LivenessMonitor {
    alive: AtomicBool,
    /// Set by the first outcome: not-alive until then means "not proven yet".
    known: AtomicBool,
    /// Nanoseconds after `epoch` of the last post; read lock-free on the hot path.
    last_post: AtomicU64,
    epoch: Instant,
    interval: Duration,
    /// Serialises posts so that the posted order matches the state order.
    post: Mutex<()>,
    tx: watch::Sender<bool>,
    /// Woken by every post, for streams that poll by hand (a waiting one
    /// holds a waiter, not a future on `tx`).
    posted: Arc<Notify>,
}

impl LivenessMonitor {
    /// A monitor that starts not-alive and re-posts an unchanged state once
    /// `interval` has passed since the last post.
    pub fn new(interval: Duration) -> Self {
        let (tx, _) = watch::channel(false);
        LivenessMonitor {
            alive: AtomicBool::new(false),
            known: AtomicBool::new(false),
            last_post: AtomicU64::new(0),
            epoch: Instant::now(),
            interval,
            post: Mutex::new(()),
            tx,
            posted: Arc::default(),
        }
    }

    /// The current state.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// True once any outcome was recorded (or a state set): a not-alive
    /// monitor that is not known yet means "not proven", not "down".
    pub fn is_known(&self) -> bool {
        self.known.load(Ordering::Acquire)
    }

    /// The re-post interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Yields the current state at once, then every posted state (changes at
    /// once; an unchanged state again every `interval` while operations flow).
    pub fn subscribe(&self) -> impl Stream<Item = bool> + Send + Unpin + 'static {
        WatchStream::new(self.tx.subscribe())
    }

    /// Resolves at the next post after this call (a change at once, an
    /// unchanged state every `interval`), for layers that react to a
    /// change at once: take it, then read [`is_alive`](Self::is_alive).
    pub(crate) fn next_post(&self) -> OwnedNotified {
        self.posted.clone().notified_owned()
    }

    /// Updates the state from an operation's outcome: success and errors that
    /// prove the backend answered mean alive; unreachable errors mean not alive.
    pub fn record<T>(&self, outcome: &Result<T>) {
        self.set(alive_after(outcome));
    }

    /// Sets the state, posting it if it changed or if `interval` has passed
    /// since the last post.
    pub fn set(&self, alive: bool) {
        if !self.known.load(Ordering::Relaxed) {
            self.known.store(true, Ordering::Release);
        }
        let now = self.elapsed_nanos();
        let interval = u64::try_from(self.interval.as_nanos()).unwrap_or(u64::MAX);
        let due = |last: u64| now.saturating_sub(last) >= interval;
        if self.alive.load(Ordering::Acquire) == alive
            && !due(self.last_post.load(Ordering::Acquire))
        {
            return;
        }
        let _order = self.post.lock().unwrap_or_else(|p| p.into_inner());
        if self.alive.load(Ordering::Acquire) == alive
            && !due(self.last_post.load(Ordering::Acquire))
        {
            return; // another caller posted meanwhile
        }
        self.alive.store(alive, Ordering::Release);
        self.last_post.store(now, Ordering::Release);
        self.tx.send_replace(alive);
        self.posted.notify_waiters();
    }

    fn elapsed_nanos(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The liveness an outcome implies: the voltha classification.
pub fn alive_after<T>(outcome: &Result<T>) -> bool {
    match outcome {
        Ok(_) => true,
        Err(e) => !Error::indicates_unreachable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt, StreamExt};

    fn next_now(s: &mut (impl Stream<Item = bool> + Unpin)) -> Option<bool> {
        s.next().now_or_never().flatten()
    }

    #[tokio::test(start_paused = true)]
    async fn initial_state_is_posted_at_once_and_not_alive() {
        let m = LivenessMonitor::new(Duration::from_secs(30));
        let mut s = m.subscribe();
        assert_eq!(next_now(&mut s), Some(false));
        assert_eq!(next_now(&mut s), None);
        assert!(!m.is_alive());
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_is_posted_immediately() {
        let m = LivenessMonitor::new(Duration::from_secs(30));
        let mut s = m.subscribe();
        assert_eq!(next_now(&mut s), Some(false));
        m.set(true);
        assert_eq!(next_now(&mut s), Some(true));
        m.set(false);
        assert_eq!(next_now(&mut s), Some(false));
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_state_is_reposted_only_after_interval() {
        let m = LivenessMonitor::new(Duration::from_secs(30));
        let mut s = m.subscribe();
        assert_eq!(next_now(&mut s), Some(false));
        m.set(true);
        assert_eq!(next_now(&mut s), Some(true));
        tokio::time::advance(Duration::from_secs(29)).await;
        m.set(true);
        assert_eq!(next_now(&mut s), None, "re-posted before the interval");
        tokio::time::advance(Duration::from_secs(1)).await;
        m.set(true);
        assert_eq!(
            next_now(&mut s),
            Some(true),
            "not re-posted after the interval"
        );
        m.set(true);
        assert_eq!(next_now(&mut s), None);
    }

    #[tokio::test(start_paused = true)]
    async fn classification_of_outcomes() {
        let b = "t";
        let cases: Vec<(Result<()>, bool)> = vec![
            (Ok(()), true),
            (
                Err(Error::Timeout {
                    backend: b,
                    operation: "get",
                    after: Duration::from_secs(1),
                }),
                false,
            ),
            (Err(Error::unavailable(b, "down", "refused")), false),
            (
                Err(Error::DataLoss {
                    backend: b,
                    message: "x".into(),
                    source: None,
                }),
                false,
            ),
            (
                Err(Error::NotFound {
                    backend: b,
                    key: "k".into(),
                }),
                true,
            ),
            (
                Err(Error::Conflict {
                    backend: b,
                    key: "k".into(),
                    expected: None,
                    actual: None,
                }),
                true,
            ),
            (
                Err(Error::InvalidKey {
                    key: "/".into(),
                    reason: "r".into(),
                }),
                true,
            ),
            (
                Err(Error::PermissionDenied {
                    backend: b,
                    message: "no".into(),
                    source: None,
                }),
                true,
            ),
            (
                Err(Error::Cancelled {
                    backend: b,
                    message: "c".into(),
                }),
                true,
            ),
        ];
        for (outcome, want) in cases {
            let m = LivenessMonitor::new(Duration::from_secs(30));
            // Start from the opposite state so that each case shows a transition.
            m.set(!want);
            m.record(&outcome);
            assert_eq!(m.is_alive(), want, "{outcome:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_subscriber_never_blocks_posting() {
        let m = LivenessMonitor::new(Duration::from_millis(1));
        let mut never_read = m.subscribe();
        let mut reader = m.subscribe();
        for i in 0..10_000 {
            m.set(i % 2 == 0);
        }
        // The slow subscriber sees only the latest state, not a backlog.
        assert_eq!(next_now(&mut never_read), Some(false));
        assert_eq!(next_now(&mut never_read), None);
        assert_eq!(next_now(&mut reader), Some(false));
    }
}
