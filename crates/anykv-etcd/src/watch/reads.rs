//! The reads that watches started now begin from, batched.
//!
//! A watch asking etcd for previous values (`prev_kv`) costs etcd a read per
//! event, on its own: etcd 3.4 looks the previous revision up for each
//! event of a key that existed before. Measured here (10,000 key watches,
//! one put each at 500 puts/s on keys that existed): that lookup cost etcd
//! about 0.26 ms of CPU per event and raised the p99 of puts on the same
//! server from 1.1-1.2 ms to 3.3-4.7 ms; without it, 1.0-1.1 ms.
//!
//! So a watch started now reads its range first (at most [`KNOWN_KEYS`] + 1
//! pairs), then asks etcd for the events after that read's revision. If the
//! range held at most [`KNOWN_KEYS`] keys it asks for no previous values and
//! gives each put the value it knows from the read or from an earlier event
//! (see `shared::Watch::known`); a range that holds more, then or later,
//! gets them from etcd. The reads of watches opened together are one
//! transaction: at most one runs per store, and the watches that ask
//! meanwhile share the next one ([`Batcher`]; up to etcd's default `--max-txn-ops`
//! reads each). A failed read is not the watch's failure: that watch starts
//! now and asks etcd for previous values, as before.

use std::{sync::Arc, time::Duration};

use anykv_core::{Key, KvPair, batch::Batcher};
use etcd_client::{GetOptions, KvClient, Txn, TxnOp, proto::PbTxnOpResponse};

use crate::{
    MAX_ATOMIC_OPS,
    range::{Range, pair, rev},
};

/// Most keys a watch keeps the pairs of, to give previous values itself.
pub(crate) const KNOWN_KEYS: usize = 16;

/// A watched range's pairs, while it holds at most [`KNOWN_KEYS`] keys
/// (one more just before the watch lets go of them). A list, not a map: a
/// search of a few pairs is as quick, and the list costs the pairs alone
/// (a map's first node has room for eleven).
#[derive(Clone, Debug, Default)]
pub(crate) struct Known(Vec<KvPair>);

impl Known {
    /// Records a put; returns the key's previous pair.
    pub(crate) fn put(&mut self, pair: KvPair) -> Option<KvPair> {
        match self.0.iter_mut().find(|p| p.key == pair.key) {
            Some(p) => Some(std::mem::replace(p, pair)),
            None => {
                self.0.push(pair);
                None
            }
        }
    }

    /// Records a delete.
    pub(crate) fn delete(&mut self, key: &Key) {
        self.0.retain(|p| p.key != *key);
    }

    /// Keys held.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// What a batch read: the revision it read at and, per range in the order
/// asked, its pairs (`None`: more than [`KNOWN_KEYS`]). `None` as a whole:
/// the read failed.
type Outcome = Option<(u64, Vec<Option<Known>>)>;

/// The range reads of one store: one transaction in flight, the ranges
/// asked meanwhile (up to [`MAX_ATOMIC_OPS`]) share the next.
#[derive(Default)]
pub(crate) struct Reads(Arc<Batcher<(), Vec<Range>, Outcome>>);

impl Reads {
    /// The revision of a read of `range` that started after this call, and
    /// the range's pairs then (`None`: more than [`KNOWN_KEYS`]); `None` if
    /// the read failed.
    pub(crate) async fn read(
        &self,
        kv: &KvClient,
        timeout: Duration,
        range: Range,
    ) -> Option<(u64, Option<Known>)> {
        let (index, outcome) = self
            .0
            .join(
                (),
                |ranges| ranges.len() >= MAX_ATOMIC_OPS,
                |ranges| {
                    ranges.push(range);
                    ranges.len() - 1
                },
                || {
                    let kv = kv.clone();
                    move |ranges: Vec<Range>| {
                        let mut kv = kv.clone();
                        async move { read_batch(&mut kv, timeout, &ranges).await }
                    }
                },
            )
            .await?;
        let (revision, ranges) = outcome.as_ref().as_ref()?;
        Some((*revision, ranges.get(index)?.clone()))
    }
}

/// One transaction reading `ranges`: all at one revision.
async fn read_batch(kv: &mut KvClient, timeout: Duration, ranges: &[Range]) -> Outcome {
    let limit = i64::try_from(KNOWN_KEYS + 1).unwrap_or(i64::MAX);
    let ops: Vec<TxnOp> = ranges
        .iter()
        .map(|r| {
            let opts = GetOptions::new().with_limit(limit);
            let opts = if r.end.is_empty() {
                opts
            } else {
                opts.with_range(r.end.clone())
            };
            TxnOp::get(r.start.clone(), Some(opts))
        })
        .collect();
    let mut resp = match tokio::time::timeout(timeout, kv.txn(Txn::new().and_then(ops))).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, ranges = ranges.len(), "etcd watch: range read failed; those watches ask etcd for previous values");
            return None;
        }
        Err(_) => {
            tracing::debug!(
                ranges = ranges.len(),
                "etcd watch: range read timed out; those watches ask etcd for previous values"
            );
            return None;
        }
    };
    let revision = rev(resp.header()?.revision());
    let answers = std::mem::take(&mut resp.0.responses);
    if answers.len() != ranges.len() {
        return None;
    }
    let mut known = Vec::with_capacity(ranges.len());
    for answer in answers {
        let Some(PbTxnOpResponse::ResponseRange(range)) = answer.response else {
            return None;
        };
        known.push((range.kvs.len() <= KNOWN_KEYS).then(|| {
            Known(
                range
                    .kvs
                    .into_iter()
                    // Keys no anykv client could write are never delivered.
                    .filter_map(|p| pair(p, None))
                    .collect(),
            )
        }));
    }
    Some((revision, known))
}
