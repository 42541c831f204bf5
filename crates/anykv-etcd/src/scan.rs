//! Reading a directory in pages, all at the revision of the first page, so a
//! long listing or export is one consistent snapshot without one huge
//! response (etcd builds a whole range response in memory).

use std::sync::Arc;

use anykv_core::{Error, Prefix, Result};
use etcd_client::{GetOptions, proto::PbKeyValue};

use crate::{conn::Conn, error::Ctx, range::Range};

/// Keys read per page.
const PAGE: i64 = 256;

/// A cursor over the pairs strictly below a prefix.
pub(crate) struct Pager {
    conn: Arc<Conn>,
    op: &'static str,
    prefix: String,
    range: Range,
    keys_only: bool,
    /// Next key to read from.
    from: Vec<u8>,
    /// Snapshot revision (0 until the first page fixes it).
    at: i64,
    limit: i64,
    done: bool,
}

impl Pager {
    pub(crate) fn new(conn: Arc<Conn>, op: &'static str, prefix: &Prefix, keys_only: bool) -> Self {
        let range = Range::below(prefix);
        Pager {
            conn,
            op,
            prefix: prefix.to_string(),
            from: range.start.clone(),
            range,
            keys_only,
            at: 0,
            limit: PAGE,
            done: false,
        }
    }

    /// Reads at revision `at` instead of the first page's (several prefixes
    /// of one snapshot).
    pub(crate) fn pinned(mut self, at: i64) -> Self {
        self.at = at;
        self
    }

    /// The revision the pages are read at (0 until the first page fixes it).
    pub(crate) fn revision(&self) -> i64 {
        self.at
    }

    /// Whether the snapshot revision is fixed (a page was read).
    pub(crate) fn started(&self) -> bool {
        self.at > 0
    }

    /// Starts over at a new snapshot (after the old one was compacted).
    pub(crate) fn restart(&mut self) {
        self.from = self.range.start.clone();
        self.at = 0;
        self.done = false;
    }

    /// The next page; `None` once the range is exhausted.
    pub(crate) async fn next(&mut self) -> Result<Option<Vec<PbKeyValue>>> {
        loop {
            if self.done {
                return Ok(None);
            }
            let mut o = GetOptions::new()
                .with_range(self.range.end.clone())
                .with_limit(self.limit);
            if self.keys_only {
                o = o.with_keys_only();
            }
            if self.at > 0 {
                o = o.with_revision(self.at);
            }
            let ctx = Ctx::new(self.op, Some(&self.prefix), self.conn.timeout());
            let from = &self.from;
            let result = self
                .conn
                .call(ctx, |c| {
                    let mut kv = c.kv.clone();
                    let (from, o) = (from.clone(), o.clone());
                    async move { kv.get(from, Some(o)).await }
                })
                .await;
            let mut resp = match result {
                Ok(r) => r,
                // A page of large values over the response limit: smaller pages.
                Err(Error::InvalidArgument { ref message, .. })
                    if self.limit > 1 && message.contains("too large") =>
                {
                    self.limit = (self.limit / 2).max(1);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if self.at == 0 {
                self.at = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let kvs: Vec<PbKeyValue> = resp.take_kvs().into_iter().map(|kv| kv.0).collect();
            match kvs.last() {
                Some(last) if more => {
                    self.from = last.key.clone();
                    self.from.push(0); // the next key after `last`
                }
                _ => self.done = true,
            }
            return Ok(Some(kvs));
        }
    }
}

/// Every pair below `prefix`, as one snapshot (started over if compaction
/// removes the snapshot revision between pages).
pub(crate) async fn all(
    conn: Arc<Conn>,
    op: &'static str,
    prefix: &Prefix,
    keys_only: bool,
) -> Result<Vec<PbKeyValue>> {
    let mut pager = Pager::new(conn, op, prefix, keys_only);
    let mut out = Vec::new();
    let mut restarts = 0;
    loop {
        match pager.next().await {
            Ok(Some(page)) => out.extend(page),
            Ok(None) => return Ok(out),
            Err(Error::Compacted { .. }) if pager.started() && restarts < 3 => {
                restarts += 1;
                out.clear();
                pager.restart();
            }
            Err(e) => return Err(e),
        }
    }
}
