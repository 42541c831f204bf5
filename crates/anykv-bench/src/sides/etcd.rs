//! Raw etcd-client baselines: N watches multiplexed on ONE gRPC watch
//! stream (client-chosen watch ids, as etcd's own clientv3 does), or one
//! watch stream per watch; both over one HTTP/2 connection. The writer is a
//! second client.

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use anyhow::{Context, Result, bail};
use etcd_client::{Client as Etcd, WatchOptions, WatchResponse, WatchStream};
use futures::{StreamExt, future::BoxFuture};

use crate::{
    case::{AbortOnDrop, Client, Holder, Names, Seen},
    measure,
    spec::{CaseSpec, Kind, Side},
};

/// The watching client and the writer of one case.
pub struct EtcdRaw {
    watcher: Etcd,
    writer: Etcd,
    root: String,
    names: Arc<Names>,
    n: usize,
    existing: bool,
    base_keys: usize,
    one_stream: bool,
    setup_concurrency: usize,
}

impl EtcdRaw {
    /// Connects both clients.
    pub async fn connect(spec: &CaseSpec) -> Result<EtcdRaw> {
        let endpoints = super::endpoints(&spec.url);
        let watcher = Etcd::connect(&endpoints, None)
            .await
            .context("etcd connect")?;
        let writer = Etcd::connect(&endpoints, None)
            .await
            .context("etcd connect")?;
        Ok(EtcdRaw {
            watcher,
            writer,
            root: format!("{}/", spec.ns),
            names: Arc::new(Names { kind: spec.kind }),
            n: spec.n,
            existing: spec.existing,
            base_keys: spec.base_keys(),
            one_stream: spec.side == Side::EtcdOneStream,
            setup_concurrency: spec.setup_concurrency,
        })
    }

    fn options(&self) -> WatchOptions {
        match self.names.kind {
            Kind::Key => WatchOptions::new(),
            // The target `p/NNNNN` covers the keys below it: `p/NNNNN/`.
            Kind::Prefix => WatchOptions::new().with_prefix(),
        }
    }

    fn watch_key(&self, i: usize) -> String {
        match self.names.kind {
            Kind::Key => format!("{}{}", self.root, self.names.target(i)),
            Kind::Prefix => format!("{}{}/", self.root, self.names.target(i)),
        }
    }

    fn write(&self, key: String, value: &'static str) -> BoxFuture<'static, Result<()>> {
        let mut kv = self.writer.kv_client();
        Box::pin(async move {
            kv.put(key, value, None).await?;
            Ok(())
        })
    }

    async fn setup_one_stream(&self, seen: Arc<Seen>) -> Result<Holder> {
        let mut watch = self.watcher.watch_client();
        let id = |i: usize| i as i64 + 1; // 0 asks the server to choose
        let mut stream = watch
            .watch(self.watch_key(0), Some(self.options().with_watch_id(id(0))))
            .await?;
        for i in 1..self.n {
            stream
                .watch(self.watch_key(i), Some(self.options().with_watch_id(id(i))))
                .await?;
        }
        let (sender, mut responses) = stream.split();
        let (names, root, seen2) = (self.names.clone(), self.root.clone(), seen.clone());
        let consumer = tokio::spawn(async move {
            loop {
                match responses.message().await {
                    Ok(Some(r)) => {
                        let i = (r.watch_id() - 1).max(0) as usize;
                        record(&seen2, &names, &root, i, &r);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        seen2.error(e.to_string());
                        break;
                    }
                }
            }
        });
        wait_created(&seen, self.n).await?;
        Ok(Box::new((sender, AbortOnDrop(consumer))) as Holder)
    }

    async fn setup_stream_per_watch(&self, seen: Arc<Seen>) -> Result<Holder> {
        let opened: Vec<(usize, WatchStream)> = futures::stream::iter((0..self.n).map(|i| {
            let mut watch = self.watcher.watch_client();
            let (key, options) = (self.watch_key(i), self.options());
            async move { anyhow::Ok((i, watch.watch(key, Some(options)).await?)) }
        }))
        .buffer_unordered(self.setup_concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
        let mut all = futures::stream::select_all(opened.into_iter().map(|(i, s)| {
            futures::stream::unfold(s, |mut s| async move {
                let item = s.message().await.transpose()?;
                Some((item, s))
            })
            .map(move |r| (i, r))
            .boxed()
        }));
        let (names, root, seen2) = (self.names.clone(), self.root.clone(), seen.clone());
        let consumer = tokio::spawn(async move {
            while let Some((i, item)) = all.next().await {
                match item {
                    Ok(r) => record(&seen2, &names, &root, i, &r),
                    Err(e) => seen2.error(e.to_string()),
                }
            }
        });
        wait_created(&seen, self.n).await?;
        Ok(Box::new(AbortOnDrop(consumer)) as Holder)
    }
}

/// Books one watch response of watch `i`.
fn record(seen: &Seen, names: &Names, root: &str, i: usize, r: &WatchResponse) {
    if r.created() {
        seen.created.fetch_add(1, Ordering::Relaxed);
    }
    if r.canceled() {
        seen.error(format!("watch {i} canceled: {}", r.cancel_reason()));
    }
    for ev in r.events() {
        let expected = format!("{root}{}", names.put_key(i));
        seen.event(i, ev.kv().is_some_and(|kv| kv.key() == expected.as_bytes()));
    }
}

/// Waits until the server confirmed `n` watches (the caller bounds the wait).
async fn wait_created(seen: &Seen, n: usize) -> Result<()> {
    while seen.created.load(Ordering::Relaxed) < n as u64 {
        if seen.errors() > 0 {
            bail!("a watch failed while the watches were being created");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

impl Client for EtcdRaw {
    fn prepare(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !self.existing {
                return Ok(());
            }
            measure::for_each_concurrent(self.n + self.base_keys, 32, |i| {
                self.write(
                    format!("{}{}", self.root, self.names.case_key(i, self.n)),
                    "v0",
                )
            })
            .await
        })
    }

    fn put(&self, i: usize) -> BoxFuture<'static, Result<()>> {
        self.write(format!("{}{}", self.root, self.names.put_key(i)), "v1")
    }

    fn base_put(&self, i: usize) -> BoxFuture<'static, Result<()>> {
        self.write(format!("{}{}", self.root, self.names.base_key(i)), "b")
    }

    fn setup(&self, seen: Arc<Seen>) -> BoxFuture<'_, Result<Holder>> {
        Box::pin(async move {
            if self.one_stream {
                self.setup_one_stream(seen).await
            } else {
                self.setup_stream_per_watch(seen).await
            }
        })
    }

    fn cleanup(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // One key at a time, as the anykv side (see `Names::case_key`).
            let _ = measure::for_each_concurrent(self.n + self.base_keys, 32, |i| {
                let mut kv = self.writer.kv_client();
                let key = format!("{}{}", self.root, self.names.case_key(i, self.n));
                async move {
                    kv.delete(key, None).await?;
                    Ok(())
                }
            })
            .await;
        })
    }
}
