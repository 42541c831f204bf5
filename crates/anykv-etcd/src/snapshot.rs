//! `snapshot` (several prefixes read at one revision) and `compact`.

use std::sync::Arc;

use anykv_core::{Error, Prefix, Result, Revision, Snapshot};
use etcd_client::CompactionOptions;

use crate::{
    conn::Conn,
    error::{BACKEND, Ctx},
    range::{pair, rev},
    scan::Pager,
};

/// Attempts when compaction removes the snapshot revision while it is read.
const ATTEMPTS: usize = 3;

/// Reads every prefix at one revision: the first prefix's first page fixes
/// it (its header revision) and every other page, of every prefix, is a
/// range pinned to it, so the pairs are exactly the state at that revision
/// whatever is written meanwhile.
pub(crate) async fn snapshot(conn: &Arc<Conn>, prefixes: &[Prefix]) -> Result<Snapshot> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match read_all(conn, prefixes).await {
            // The pinned revision was compacted between two pages: start over
            // at a new one.
            Err(Error::Compacted { .. }) if attempt < ATTEMPTS => continue,
            other => return other,
        }
    }
}

async fn read_all(conn: &Arc<Conn>, prefixes: &[Prefix]) -> Result<Snapshot> {
    let mut at = 0;
    let mut pairs = Vec::new();
    for prefix in prefixes {
        let mut pager = Pager::new(conn.clone(), "snapshot", prefix, false);
        if at > 0 {
            pager = pager.pinned(at);
        }
        while let Some(page) = pager.next().await? {
            pairs.extend(page.into_iter().filter_map(|kv| pair(kv, None)));
        }
        at = pager.revision();
    }
    Ok(Snapshot {
        revision: rev(at),
        pairs,
    })
}

/// etcd compaction, physical (it returns once the history is gone, so a
/// watch from below fails at once). At or below an already compacted
/// revision it is a no-op; above the current revision, `InvalidArgument`.
pub(crate) async fn compact(conn: &Arc<Conn>, revision: Revision) -> Result<()> {
    if revision == 0 {
        return Ok(()); // nothing comes before the first revision
    }
    let Ok(at) = i64::try_from(revision) else {
        return Err(Error::InvalidArgument {
            backend: BACKEND,
            message: format!("compact: revision {revision} is beyond any etcd revision"),
        });
    };
    let ctx = Ctx::new("compact", None, conn.timeout());
    let result = conn
        .call(ctx, |c| {
            let mut kv = c.kv.clone();
            async move {
                kv.compact(at, Some(CompactionOptions::new().with_physical()))
                    .await
            }
        })
        .await;
    match result {
        Ok(_) | Err(Error::Compacted { .. }) => Ok(()),
        Err(Error::InvalidArgument { message, .. }) if message.contains("future revision") => {
            Err(Error::InvalidArgument {
                backend: BACKEND,
                message: format!(
                    "compact: revision {revision} is above the current revision ({message})"
                ),
            })
        }
        Err(e) => Err(e),
    }
}
