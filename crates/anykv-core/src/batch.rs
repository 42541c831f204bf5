//! Callers that share the next run of an operation.
//!
//! A driver that must read something for each of many callers (the state a
//! new watch starts from, say) can read for all of them at once. While one
//! run is in flight, the callers that ask meanwhile join the next batch,
//! which runs as soon as that one ends. A burst of N callers so costs a few
//! runs, not N, and every caller's run still starts after it asked: what
//! was acknowledged before the call is in its outcome. The etcd driver
//! reads the ranges of the watches opened together in one transaction; the
//! Consul driver reads their baselines in one query per shared loop.
//!
//! The runs of a key happen on a task of their own, one after the other: a
//! caller that gives up (its deadline) leaves the others of its batch
//! served.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::watch;

/// Batches of callers waiting for a run, per key (`()` for a single queue);
/// the outcome of a run is shared by the callers of its batch.
///
/// `B` is what a batch collects (the ranges to read, say), `O` what its run
/// returns.
///
/// ```
/// use std::sync::Arc;
/// use anykv_core::batch::Batcher;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // Key lengths, computed once per batch of keys asked together.
/// let batcher: Arc<Batcher<(), Vec<String>, Vec<usize>>> = Arc::default();
/// let ask = |key: &str| {
///     let (batcher, key) = (batcher.clone(), key.to_owned());
///     async move {
///         let (index, lengths) = batcher
///             .join(
///                 (),
///                 |batch| batch.len() >= 128, // a batch takes 128 keys at most
///                 |batch| {
///                     batch.push(key);
///                     batch.len() - 1
///                 },
///                 || |batch: Vec<String>| async move {
///                     batch.iter().map(String::len).collect::<Vec<_>>()
///                 },
///             )
///             .await
///             .expect("the run ended");
///         lengths[index]
///     }
/// };
/// let (a, b) = tokio::join!(ask("one"), ask("three"));
/// assert_eq!((a, b), (3, 5));
/// # }
/// ```
pub struct Batcher<K, B, O> {
    /// A key has an entry while its runner task runs.
    queues: Mutex<HashMap<K, VecDeque<Waiting<B, O>>>>,
}

/// A batch not run yet, and where its outcome goes.
struct Waiting<B, O> {
    batch: B,
    done: watch::Sender<Option<Arc<O>>>,
}

impl<K, B, O> Default for Batcher<K, B, O> {
    fn default() -> Self {
        Batcher {
            queues: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, B, O> Batcher<K, B, O>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    B: Default + Send + 'static,
    O: Send + Sync + 'static,
{
    fn queues(&self) -> MutexGuard<'_, HashMap<K, VecDeque<Waiting<B, O>>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the caller to the batch of `key` being collected (a new one if
    /// there is none or `full` says so): `add` puts its part in and returns
    /// what the caller needs to find its answer (its position, say). Waits
    /// for that batch's run, which starts after this call; returns `add`'s
    /// result and the run's outcome, or `None` if the run never finished
    /// (it panicked, or the runtime is shutting down).
    ///
    /// If no run of `key` is in flight, a task is started that runs the
    /// batches one after the other with the function `runner` makes, until
    /// none is left.
    pub async fn join<R, F, Fut>(
        self: &Arc<Self>,
        key: K,
        full: impl FnOnce(&B) -> bool,
        add: impl FnOnce(&mut B) -> R,
        runner: impl FnOnce() -> F,
    ) -> Option<(R, Arc<O>)>
    where
        F: FnMut(B) -> Fut + Send + 'static,
        Fut: Future<Output = O> + Send + 'static,
    {
        let (mut done, joined) = {
            let mut queues = self.queues();
            let idle = !queues.contains_key(&key);
            let queue = queues.entry(key.clone()).or_default();
            if queue.back().is_none_or(|w| full(&w.batch)) {
                queue.push_back(Waiting {
                    batch: B::default(),
                    done: watch::channel(None).0,
                });
            }
            let last = queue.back_mut()?;
            let joined = add(&mut last.batch);
            let done = last.done.subscribe();
            if idle {
                tokio::spawn(self.clone().run(key, runner()));
            }
            (done, joined)
        };
        let outcome = done.wait_for(Option::is_some).await.ok()?.clone()?;
        Some((joined, outcome))
    }

    /// Runs the batches of `key` in order until none is left.
    async fn run<F, Fut>(self: Arc<Self>, key: K, mut run: F)
    where
        F: FnMut(B) -> Fut,
        Fut: Future<Output = O>,
    {
        // If a run panics, the key's queue goes with it: its callers get
        // `None` (their senders are dropped) and the next caller starts a
        // new runner rather than waiting for this one.
        let guard = Forget {
            batcher: &self,
            key: &key,
        };
        loop {
            let next = {
                let mut queues = self.queues();
                match queues.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(next) => next,
                    None => {
                        queues.remove(&key);
                        std::mem::forget(guard);
                        return;
                    }
                }
            };
            // From here on new callers join the next batch: this run
            // starts after every caller of its own asked.
            let outcome = run(next.batch).await;
            next.done.send_replace(Some(Arc::new(outcome)));
        }
    }
}

/// Removes a key's queue when its runner unwinds.
struct Forget<'a, K: Hash + Eq, B, O> {
    batcher: &'a Batcher<K, B, O>,
    key: &'a K,
}

impl<K: Hash + Eq, B, O> Drop for Forget<'_, K, B, O> {
    fn drop(&mut self) {
        self.batcher
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    type Log = Arc<Mutex<Vec<Vec<u32>>>>;

    /// Joins `n` to `key`'s batch; the run records its batch and answers
    /// with it, after `pause`.
    async fn ask(
        batcher: &Arc<Batcher<u8, Vec<u32>, Vec<u32>>>,
        log: &Log,
        key: u8,
        n: u32,
        pause: Duration,
    ) -> Option<(usize, Arc<Vec<u32>>)> {
        let log = log.clone();
        batcher
            .join(
                key,
                |b| b.len() >= 3,
                |b| {
                    b.push(n);
                    b.len() - 1
                },
                move || {
                    move |batch: Vec<u32>| {
                        let log = log.clone();
                        async move {
                            tokio::time::sleep(pause).await;
                            assert!(!batch.contains(&99), "a run that panics");
                            log.lock().unwrap().push(batch.clone());
                            batch
                        }
                    }
                },
            )
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn callers_that_ask_during_a_run_share_the_next() {
        let batcher = Arc::default();
        let log = Log::default();
        let pause = Duration::from_millis(10);
        let first = tokio::spawn({
            let (b, l) = (Arc::clone(&batcher), log.clone());
            async move { ask(&b, &l, 0, 1, pause).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        // The first run is in flight: these five make two batches (three
        // at most each), run after it, in order.
        let rest: Vec<_> = (2..=6)
            .map(|n| {
                let (b, l) = (Arc::clone(&batcher), log.clone());
                tokio::spawn(async move { ask(&b, &l, 0, n, pause).await })
            })
            .collect();
        let (index, outcome) = first.await.unwrap().unwrap();
        assert_eq!((index, outcome.as_slice()), (0, &[1][..]));
        for (n, task) in (2..=6).zip(rest) {
            let (index, outcome) = task.await.unwrap().unwrap();
            assert_eq!(outcome[index], n, "each caller finds its own part");
        }
        assert_eq!(
            *log.lock().unwrap(),
            vec![vec![1], vec![2, 3, 4], vec![5, 6]]
        );
        assert!(batcher.queues().is_empty(), "the runner ended");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_run_apart() {
        let batcher = Arc::default();
        let log = Log::default();
        let pause = Duration::from_millis(10);
        let (a, b) = tokio::join!(
            ask(&batcher, &log, 1, 10, pause),
            ask(&batcher, &log, 2, 20, pause)
        );
        assert_eq!(a.unwrap().1.as_slice(), &[10]);
        assert_eq!(b.unwrap().1.as_slice(), &[20]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_panics_fails_its_callers_only() {
        let batcher = Arc::default();
        let log = Log::default();
        let pause = Duration::from_millis(10);
        assert!(ask(&batcher, &log, 0, 99, pause).await.is_none());
        let (_, outcome) = ask(&batcher, &log, 0, 7, pause).await.unwrap();
        assert_eq!(outcome.as_slice(), &[7], "a new runner serves the next");
    }
}
