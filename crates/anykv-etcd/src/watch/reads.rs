//! The reads that key watches started now begin from, batched.
//!
//! A watch asking etcd for previous values (`prev_kv`) costs etcd a read per
//! event, on its own: etcd 3.4 looks the previous revision up for each
//! event of a key that existed before. Measured here (10,000 key watches,
//! one put each at 500 puts/s on keys that existed): that lookup cost etcd
//! about 0.26 ms of CPU per event and raised the p99 of puts on the same
//! server from 1.1-1.2 ms to 3.3-4.7 ms; without it, 1.2-1.8 ms.
//!
//! So a key watch started now reads its key first, then asks etcd for the
//! events after that read's revision without previous values, and gives
//! each put the value it knows from the read or from the previous event
//! (see `shared::Watch::known`). The reads of watches opened together are
//! one transaction: at most one runs per store, and the watches that ask
//! meanwhile share the next one (up to etcd's default `--max-txn-ops`
//! reads each). A failed read is not the watch's failure: that watch asks
//! etcd for previous values, as before.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use anykv_core::{Key, KvPair};
use etcd_client::{KvClient, Txn, TxnOp, proto::PbTxnOpResponse};
use tokio::sync::watch;

use crate::{
    MAX_ATOMIC_OPS,
    range::{pair, rev},
};

/// What a batch read: the revision it read at and, per key in the order
/// asked, the pair (`None`: absent). `None` as a whole: the read failed.
type Outcome = Option<(u64, Vec<Option<KvPair>>)>;

/// Keys waiting for the same read.
struct Batch {
    keys: Vec<Key>,
    done: watch::Sender<Option<std::sync::Arc<Outcome>>>,
}

/// The key reads of one store.
#[derive(Default)]
pub(crate) struct Reads {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Batches not read yet, oldest first; only the last takes new keys.
    queue: VecDeque<Batch>,
    /// A task reads the queue.
    busy: bool,
}

impl Reads {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The revision of a read of `key` that started after this call, and
    /// the key's pair then; `None` if the read failed.
    pub(crate) async fn read(
        self: &std::sync::Arc<Self>,
        kv: &KvClient,
        timeout: Duration,
        key: &Key,
    ) -> Option<(u64, Option<KvPair>)> {
        let (mut done, index) = {
            let mut st = self.state();
            if st
                .queue
                .back()
                .is_none_or(|b| b.keys.len() >= MAX_ATOMIC_OPS)
            {
                st.queue.push_back(Batch {
                    keys: Vec::new(),
                    done: watch::channel(None).0,
                });
            }
            let batch = st.queue.back_mut()?;
            batch.keys.push(key.clone());
            let joined = (batch.done.subscribe(), batch.keys.len() - 1);
            if !st.busy {
                st.busy = true;
                // A task of its own: a caller that gives up (its timeout)
                // must not leave the queue without a reader.
                tokio::spawn(self.clone().run(kv.clone(), timeout));
            }
            joined
        };
        let outcome = done.wait_for(Option::is_some).await.ok()?.clone()?;
        let (revision, pairs) = outcome.as_ref().as_ref()?;
        Some((*revision, pairs.get(index)?.clone()))
    }

    /// Reads the queued batches one after the other until none is left.
    async fn run(self: std::sync::Arc<Self>, mut kv: KvClient, timeout: Duration) {
        loop {
            let batch = {
                let mut st = self.state();
                match st.queue.pop_front() {
                    Some(b) => b,
                    None => {
                        st.busy = false;
                        return;
                    }
                }
            };
            let outcome = read_batch(&mut kv, timeout, &batch.keys).await;
            batch.done.send_replace(Some(std::sync::Arc::new(outcome)));
        }
    }
}

/// One transaction reading `keys`: all at one revision.
async fn read_batch(kv: &mut KvClient, timeout: Duration, keys: &[Key]) -> Outcome {
    let ops: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.as_str(), None)).collect();
    let mut resp = match tokio::time::timeout(timeout, kv.txn(Txn::new().and_then(ops))).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, keys = keys.len(), "etcd watch: key read failed; those watches ask etcd for previous values");
            return None;
        }
        Err(_) => {
            tracing::debug!(
                keys = keys.len(),
                "etcd watch: key read timed out; those watches ask etcd for previous values"
            );
            return None;
        }
    };
    let revision = rev(resp.header()?.revision());
    let answers = std::mem::take(&mut resp.0.responses);
    if answers.len() != keys.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(keys.len());
    for (key, answer) in keys.iter().zip(answers) {
        let Some(PbTxnOpResponse::ResponseRange(range)) = answer.response else {
            return None;
        };
        pairs.push(
            range
                .kvs
                .into_iter()
                .next()
                .and_then(|p| pair(p, Some(key))),
        );
    }
    Some((revision, pairs))
}
