//! The znode tree: implicit parents, subtree scans, subtree deletes and the
//! removal of parents nothing needs any more.

use zookeeper_client::{self as zk, CreateMode, CreateOptions, MultiReadResult, Stat};

use crate::codec::{self, DIR};

/// znodes read per multi-read request (two reads each): bounded so that a
/// response of ordinary values stays far below the client's buffers.
pub(crate) const READ_CHUNK: usize = 64;

/// Writes per multi request of a subtree delete.
const DELETE_CHUNK: usize = 256;

/// Attempts at an operation that races with concurrent tree changes (a
/// parent removed between its creation and the child's).
pub(crate) const RACE_ATTEMPTS: usize = 16;

/// One znode read by [`scan`].
pub(crate) struct Scanned {
    pub(crate) path: String,
    pub(crate) data: Vec<u8>,
    pub(crate) stat: Stat,
}

/// Creates `path`, creating missing parents as implicit-parent markers
/// (persistent znodes holding [`DIR`]).
pub(crate) async fn create(
    client: &zk::Client,
    path: &str,
    data: &[u8],
    options: &CreateOptions<'_>,
    dir_options: &CreateOptions<'_>,
) -> Result<Stat, zk::Error> {
    for _ in 0..RACE_ATTEMPTS {
        match client.create(path, data, options).await {
            Ok((stat, _)) => return Ok(stat),
            Err(zk::Error::NoNode) => ensure_parents(client, path, dir_options).await?,
            Err(e) => return Err(e),
        }
    }
    Err(zk::Error::NoNode)
}

/// Makes sure every ancestor of `path` exists, creating the missing ones as
/// markers. Walks up from the parent until one exists, then back down.
pub(crate) async fn ensure_parents(
    client: &zk::Client,
    path: &str,
    dir_options: &CreateOptions<'_>,
) -> Result<(), zk::Error> {
    let ancestors = codec::ancestors(path);
    if ancestors.is_empty() {
        return Ok(());
    }
    let mut i = 0; // index into `ancestors`, deepest first
    let mut steps = 0;
    loop {
        steps += 1;
        if steps > 4 * ancestors.len() + RACE_ATTEMPTS {
            return Err(zk::Error::NoNode);
        }
        match client.create(ancestors[i], DIR, dir_options).await {
            Ok(_) | Err(zk::Error::NodeExists) => {
                if i == 0 {
                    return Ok(());
                }
                i -= 1;
            }
            Err(zk::Error::NoNode) if i + 1 < ancestors.len() => i += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Options of an implicit parent.
pub(crate) fn dir_options(acls: zk::Acls<'static>) -> CreateOptions<'static> {
    CreateMode::Persistent.with_acls(acls)
}

/// Every znode strictly below `base`, level by level with multi-reads (one
/// round trip per depth level and 64 znodes). ZooKeeper's own `/zookeeper`
/// subtree is skipped. Not a snapshot: znodes changed during the scan show
/// either state; znodes deleted during it are left out.
pub(crate) async fn scan(client: &zk::Client, base: &str) -> Result<Vec<Scanned>, zk::Error> {
    let bases = [base.to_owned()];
    Ok(scan_many(client, &bases).await?.pop().unwrap_or_default())
}

/// [`scan`] of several subtrees at once: each depth level of all of them in
/// shared multi-reads of 64 znodes, all sent at once (pipelined). N small
/// subtrees cost about 2N/64 requests and one round trip per level, instead
/// of two requests and two round trips each. Returns one `Vec` per base, in
/// the order of `bases`.
pub(crate) async fn scan_many(
    client: &zk::Client,
    bases: &[String],
) -> Result<Vec<Vec<Scanned>>, zk::Error> {
    let mut out: Vec<Vec<Scanned>> = bases.iter().map(|_| Vec::new()).collect();
    // (index of its base, path)
    let mut level: Vec<(usize, String)> = Vec::new();
    let mut pending = Vec::new();
    for chunk in bases.chunks(READ_CHUNK) {
        let mut reader = client.new_multi_reader();
        for b in chunk {
            reader.add_get_children(b)?;
        }
        pending.push(reader.commit());
    }
    for (c, results) in futures::future::join_all(pending)
        .await
        .into_iter()
        .enumerate()
    {
        for (j, r) in results?.into_iter().enumerate() {
            let i = c * READ_CHUNK + j;
            let Some(base) = bases.get(i) else { break };
            match r {
                MultiReadResult::Children { children } => level.extend(
                    children
                        .iter()
                        .map(|name| (i, codec::child_path(base, name)))
                        .filter(|(_, p)| !codec::is_system(p)),
                ),
                MultiReadResult::Error {
                    err: zk::Error::NoNode,
                } => {}
                MultiReadResult::Error { err } => return Err(err),
                _ => {}
            }
        }
    }
    while !level.is_empty() {
        let mut pending = Vec::new();
        for chunk in level.chunks(READ_CHUNK) {
            let mut reader = client.new_multi_reader();
            for (_, p) in chunk {
                reader.add_get_data(p)?;
                reader.add_get_children(p)?;
            }
            pending.push(reader.commit());
        }
        let mut next = Vec::new();
        for (chunk, results) in level
            .chunks(READ_CHUNK)
            .zip(futures::future::join_all(pending).await)
        {
            let mut results = results?.into_iter();
            for (i, p) in chunk {
                let (Some(data), Some(children)) = (results.next(), results.next()) else {
                    break;
                };
                match (data, children) {
                    (
                        MultiReadResult::Data { data, stat },
                        MultiReadResult::Children { children },
                    ) => {
                        next.extend(children.iter().map(|c| (*i, codec::child_path(p, c))));
                        out[*i].push(Scanned {
                            path: p.clone(),
                            data,
                            stat,
                        });
                    }
                    (MultiReadResult::Error { err }, _) | (_, MultiReadResult::Error { err })
                        if err != zk::Error::NoNode =>
                    {
                        return Err(err);
                    }
                    // Deleted since its parent was read.
                    _ => {}
                }
            }
        }
        level = next;
    }
    Ok(out)
}

/// Reads a set of znodes in one consistent multi-read per 64 paths:
/// `(data, stat)` for each that exists.
pub(crate) async fn read_many(
    client: &zk::Client,
    paths: &[String],
) -> Result<Vec<Option<(Vec<u8>, Stat)>>, zk::Error> {
    let mut out = Vec::with_capacity(paths.len());
    for chunk in paths.chunks(READ_CHUNK) {
        let mut reader = client.new_multi_reader();
        for p in chunk {
            reader.add_get_data(p)?;
        }
        for r in reader.commit().await? {
            out.push(match r {
                MultiReadResult::Data { data, stat } => Some((data, stat)),
                MultiReadResult::Error {
                    err: zk::Error::NoNode,
                } => None,
                MultiReadResult::Error { err } => return Err(err),
                _ => None,
            });
        }
    }
    Ok(out)
}

/// Removes the markers above `path` that nothing needs any more (an implicit
/// parent left without children), in one multi with version checks, so a
/// parent that became a key or got a new child in the meantime stays.
/// Best effort: a race simply leaves the markers, which are not keys.
pub(crate) async fn prune(client: &zk::Client, path: &str) {
    prune_from(client, &codec::ancestors(path)).await;
}

/// [`prune`] starting at `path` itself (it too may be an empty marker).
pub(crate) async fn prune_self(client: &zk::Client, path: &str) {
    if path == "/" || codec::is_system(path) {
        return;
    }
    let mut chain = vec![path];
    chain.extend(codec::ancestors(path));
    prune_from(client, &chain).await;
}

async fn prune_from(client: &zk::Client, chain: &[&str]) {
    if chain.is_empty() {
        return;
    }
    let paths: Vec<String> = chain.iter().map(|p| p.to_string()).collect();
    let Ok(read) = read_many(client, &paths).await else {
        return;
    };
    let mut doomed = Vec::new();
    for (i, node) in read.into_iter().enumerate() {
        let Some((data, stat)) = node else { break };
        // The deepest may have no child left; each one above exactly one:
        // the marker below it that goes in the same multi.
        let children_allowed = if i == 0 { 0 } else { 1 };
        if data != DIR || stat.num_children != children_allowed {
            break;
        }
        doomed.push((paths[i].clone(), stat.version));
    }
    if doomed.is_empty() {
        return;
    }
    let mut writer = client.new_multi_writer();
    for (p, version) in &doomed {
        if writer.add_delete(p, Some(*version)).is_err() {
            return;
        }
    }
    if let Err(e) = writer.commit().await {
        tracing::trace!(error = %e, "zookeeper: parent markers kept (changed meanwhile)");
    }
}

/// Deletes every znode strictly below `base` (deepest first, in multis of
/// 256) and returns how many of them were keys. A znode that gains a child
/// meanwhile is turned into a marker if it was a key, so it stops being one.
pub(crate) async fn delete_below(client: &zk::Client, base: &str) -> Result<u64, zk::Error> {
    let mut deleted = 0;
    for _ in 0..RACE_ATTEMPTS {
        let mut nodes = scan(client, base).await?;
        if nodes.is_empty() {
            return Ok(deleted);
        }
        let now = codec::now_millis();
        // Deepest first: children before their parents.
        nodes.sort_by(|a, b| {
            let depth = |p: &str| p.bytes().filter(|&c| c == b'/').count();
            depth(&b.path).cmp(&depth(&a.path))
        });
        let mut raced = false;
        for chunk in nodes.chunks(DELETE_CHUNK) {
            let mut writer = client.new_multi_writer();
            for n in chunk {
                writer.add_delete(&n.path, None)?;
            }
            match writer.commit().await {
                Ok(_) => {
                    deleted += chunk.iter().filter(|n| is_key(n, now)).count() as u64;
                }
                Err(zk::MultiWriteError::RequestFailed { source }) => return Err(source),
                Err(zk::MultiWriteError::OperationFailed { .. }) => {
                    // Someone changed the subtree: go one by one.
                    raced = true;
                    for n in chunk {
                        match client.delete(&n.path, None).await {
                            Ok(()) => deleted += u64::from(is_key(n, now)),
                            Err(zk::Error::NoNode) => {}
                            Err(zk::Error::NotEmpty) => {
                                if is_key(n, now)
                                    && client.set_data(&n.path, DIR, None).await.is_ok()
                                {
                                    deleted += 1;
                                }
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
        if !raced {
            return Ok(deleted);
        }
    }
    Ok(deleted)
}

fn is_key(n: &Scanned, now: i64) -> bool {
    codec::is_key(&n.data, &n.stat, now)
}
