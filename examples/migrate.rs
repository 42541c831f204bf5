//! Copies a prefix from one store to another, with a progress bar.
//!
//! ```text
//! cargo run --example migrate                                   # a seeded memory:// store -> a redb file in the temp dir
//! cargo run --example migrate -- SRC_URL DST_URL [PREFIX]
//! cargo run --example migrate -- etcd://127.0.0.1:2379 redb://backup.redb app
//! ```
//!
//! When the source declares `snapshot` (etcd, Consul, redb, memory,
//! ZooKeeper by verified double read), the source is read at one revision,
//! so the copy is a consistent picture even while the source keeps taking
//! writes; otherwise it is streamed with `export`, each key current when
//! read. Writes to the destination run a few at a time. Values and keys are
//! copied; versions and TTLs are not (the destination assigns its own), and
//! keys present only in the destination are left alone.

use std::path::PathBuf;

use anyhow::Context;
use anykv::{KvPair, Prefix, PutOptions, Store, StoreExt};
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};

/// Destination writes in flight at once: enough to hide a network round
/// trip, few enough not to flood a server.
const CONCURRENCY: usize = 16;

/// Keys the default demo seeds into its source.
pub const DEMO_KEYS: usize = 2_000;

/// What a copy did.
#[derive(Debug)]
pub struct Outcome {
    /// Pairs copied.
    pub copied: u64,
    /// The source revision of a consistent (snapshot) read, if one was used.
    pub snapshot_revision: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = anykv_examples::Args::parse(&[])?;
    let prefix = Prefix::new(args.positional(2, "demo"))?;
    // A named memory store lives while a handle does: `_demo_source` keeps
    // the seeded one open until the copy is done.
    let (src, _demo_source) = if args.has_positional(0) {
        (args.positional(0, ""), None)
    } else {
        // No source given: a named in-memory store with generated pairs.
        let url = "memory://migrate-demo";
        let kv = anykv::open(url).await?;
        seed(&kv, &prefix, DEMO_KEYS).await?;
        (url.to_owned(), Some(kv))
    };
    let dst = if args.has_positional(1) {
        args.positional(1, "")
    } else {
        let file: PathBuf = std::env::temp_dir().join("anykv-migrate-demo.redb");
        format!("redb://{}", file.display())
    };
    let outcome = run(&src, &dst, &prefix, progress_bar()).await?;
    println!(
        "copied {} pairs below {prefix} from {src} to {dst}{}",
        outcome.copied,
        match outcome.snapshot_revision {
            Some(rev) => format!(" (consistent read at source revision {rev})"),
            None => " (streamed; no snapshot on this backend)".into(),
        }
    );
    Ok(())
}

/// A bar on stderr; indicatif hides it when stderr is not a terminal.
fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} pairs {per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// Writes `n` generated pairs below `prefix`.
pub async fn seed(kv: &anykv::Kv, prefix: &Prefix, n: usize) -> anykv::Result<()> {
    futures::stream::iter(0..n)
        .map(|i| {
            let key = format!("{}/item-{i:05}", prefix.as_str());
            async move { kv.set(&key, format!("{{\"n\":{i}}}")).await }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Copies every pair below `prefix` from `src` to `dst`, reporting to `bar`.
pub async fn run(
    src: &str,
    dst: &str,
    prefix: &Prefix,
    bar: ProgressBar,
) -> anyhow::Result<Outcome> {
    let source = anykv::open(src)
        .await
        .with_context(|| format!("opening the source {src}"))?;
    let dest = anykv::open(dst)
        .await
        .with_context(|| format!("opening the destination {dst}"))?;

    let (pairs, snapshot_revision) = if source.capabilities().snapshot.is_some() {
        // One read at one revision: a consistent picture of the prefix.
        let snap = source.snapshot(std::slice::from_ref(prefix)).await?;
        bar.set_length(snap.pairs.len() as u64);
        let pairs = futures::stream::iter(snap.pairs.into_iter().map(Ok)).boxed();
        (pairs, Some(snap.revision))
    } else {
        // No total known up front: the bar counts without a length.
        (source.export(prefix).await?, None)
    };

    let copied = pairs
        .map(|pair: anykv::Result<KvPair>| {
            let dest = &dest;
            async move {
                let pair = pair?;
                dest.put(&pair.key, pair.value, PutOptions::default()).await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .inspect_ok(|_| bar.inc(1))
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await
        .context("copying")?;
    bar.finish();
    dest.close().await?;
    Ok(Outcome {
        copied,
        snapshot_revision,
    })
}
