//! A user-defined layer sees every operation, in order, on every backend;
//! standard layers can be dropped and replaced; chaos is selectable by URL.
//!
//! memory and redb always run; etcd, Consul and ZooKeeper run when
//! `ANYKV_TEST_ETCD` / `ANYKV_TEST_CONSUL` / `ANYKV_TEST_ZK` are set (as
//! `cargo xtask test` does).

use std::sync::{Arc, Mutex};

use anykv::{
    Condition, ErrorKind, Key, KvPair, Layer, LockOptions, Next, Op, OpKind, Prefix, PutOptions,
    Request, Response, SessionOptions, StandardLayer, Start, Store, StoreExt, Target, Version,
    async_trait, layers::chaos::ChaosLayer,
};
use futures::StreamExt;

/// Records the kind of every request it sees.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<OpKind>>>);

#[async_trait]
impl Layer for Recorder {
    async fn call(&self, req: Request, next: Next<'_>) -> anykv::Result<Response> {
        self.0.lock().expect("test").push(req.kind());
        next.run(req).await
    }
}

/// Calls the `Store` method of `kind`. The match has no wildcard: a new
/// `OpKind` does not compile until it is called here.
async fn call(kv: &anykv::Kv, kind: OpKind) -> anykv::Result<()> {
    let k = Key::new("rec/a").expect("test");
    let p = Prefix::new("rec").expect("test");
    match kind {
        OpKind::Get => kv.get(&k).await.map(drop),
        OpKind::Put => kv
            .put(&k, "v".into(), PutOptions::default())
            .await
            .map(drop),
        OpKind::Delete => kv.delete(&k, Condition::Always).await.map(drop),
        OpKind::Exists => kv.exists(&k).await.map(drop),
        OpKind::List => kv.list(&p).await.map(drop),
        OpKind::Keys => kv.keys(&p).await.map(drop),
        OpKind::DeletePrefix => kv.delete_prefix(&p).await.map(drop),
        OpKind::Watch => kv.watch(Target::Prefix(p), Start::Now).await.map(drop),
        OpKind::Lock => kv.lock(&k, LockOptions::default()).await?.release().await,
        OpKind::TryLock => match kv.try_lock(&k, LockOptions::default()).await? {
            Some(g) => g.release().await,
            None => Ok(()),
        },
        OpKind::LockHolder => kv.lock_holder(&k).await.map(drop),
        OpKind::Session => {
            let session = kv.session(SessionOptions::default()).await?;
            let eph = Key::new("rec/ephemeral")?;
            session.put(&eph, "e".into(), Condition::Always).await?;
            session.close().await
        }
        OpKind::Atomic => kv
            .atomic(vec![], vec![Op::Put(Key::new("rec/b")?, "x".into())])
            .await
            .map(drop),
        OpKind::Snapshot => kv.snapshot(&[p]).await.map(drop),
        // Revision 1 discards no history anyone else on a shared server needs.
        OpKind::Compact => kv.compact(1).await,
        OpKind::Export => {
            let pairs: Vec<_> = kv.export(&p).await?.collect().await;
            pairs.into_iter().try_for_each(|r| r.map(drop))
        }
        OpKind::Import => {
            let pair = KvPair {
                key: Key::new("rec/c")?,
                value: "i".into(),
                version: Version::new(0),
                create_revision: 0,
                mod_revision: 0,
            };
            kv.import(futures::stream::iter([Ok(pair)]).boxed())
                .await
                .map(drop)
        }
        OpKind::Probe => kv.probe().await,
        OpKind::Close => kv.close().await,
    }
}

/// `url` with a fresh namespace, so runs never meet.
fn fresh(url: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("test")
        .as_nanos();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}prefix=layers-{}-{nanos}", std::process::id())
}

/// Runs every operation through a recording layer over `url`: the layer
/// sees each one, in the order called.
async fn a_layer_sees_every_operation(url: &str) {
    let rec = Recorder::default();
    let kv = anykv::builder(&fresh(url))
        .layer(rec.clone())
        .open()
        .await
        .expect("open");
    let backend = kv.backend();
    // Setup through the same handle is recorded too.
    kv.set("rec/a", "v").await.expect("setup");
    for kind in OpKind::ALL {
        if let Err(e) = tokio::time::timeout(std::time::Duration::from_secs(30), call(&kv, *kind))
            .await
            .unwrap_or_else(|_| panic!("{backend}: {kind} timed out"))
        {
            // A layer sees what a backend cannot do, too.
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{backend}: {kind}: {e}");
        }
    }
    let mut want = vec![OpKind::Put];
    want.extend(OpKind::ALL);
    assert_eq!(*rec.0.lock().expect("test"), want, "{backend}");
}

#[test]
fn every_store_method_has_a_request() {
    // Adding a `Store` method without an `OpKind` (and so a `Request`) fails here.
    let src = include_str!("../../crates/anykv-core/src/store.rs");
    let start = src.find("pub trait Store").expect("trait Store");
    let body = &src[start..];
    let end = body.find("\n}\n").expect("end of trait");
    let methods: Vec<&str> = body[..end]
        .split("async fn ")
        .skip(1)
        .map(|s| s.split('(').next().expect("test").trim())
        .collect();
    let names: Vec<&str> = OpKind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(methods, names, "Store methods vs OpKind::ALL");
}

#[tokio::test]
async fn memory() {
    a_layer_sees_every_operation("memory://layers").await;
}

#[tokio::test]
async fn redb() {
    let dir = std::env::temp_dir().join(format!("anykv-layers-{}.redb", std::process::id()));
    let url = format!("redb://{}", dir.display());
    a_layer_sees_every_operation(&url).await;
    let _ = std::fs::remove_file(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd() {
    if let Some(url) = anykv_testkit::server_url("ANYKV_TEST_ETCD") {
        a_layer_sees_every_operation(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul() {
    if let Some(url) = anykv_testkit::server_url("ANYKV_TEST_CONSUL") {
        a_layer_sees_every_operation(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper() {
    if let Some(url) = anykv_testkit::server_url("ANYKV_TEST_ZK") {
        a_layer_sees_every_operation(&url).await;
    }
}

/// Counts the requests that reach the level it sits at.
#[derive(Clone, Default)]
struct Count(Arc<Mutex<u32>>);

#[async_trait]
impl Layer for Count {
    async fn call(&self, req: Request, next: Next<'_>) -> anykv::Result<Response> {
        *self.0.lock().expect("test") += 1;
        next.run(req).await
    }
}

#[tokio::test(start_paused = true)]
async fn standard_layers_can_be_dropped_and_replaced() {
    // Chaos below, retry in place: a refused get is tried three times.
    let attempts = Count::default();
    let chaos = ChaosLayer::new(0);
    chaos.handle().set_unreachable(true);
    let kv = anykv::builder(&fresh("memory://layers-std"))
        .layer_below(attempts.clone())
        .layer_below(chaos)
        .open()
        .await
        .expect("test");
    kv.value("a").await.expect_err("test");
    assert_eq!(*attempts.0.lock().expect("test"), 3, "the default policy");

    // Retry dropped: once.
    let attempts = Count::default();
    let chaos = ChaosLayer::new(0);
    chaos.handle().set_unreachable(true);
    let kv = anykv::builder(&fresh("memory://layers-std"))
        .without(StandardLayer::Retry)
        .layer_below(attempts.clone())
        .layer_below(chaos)
        .open()
        .await
        .expect("test");
    kv.value("a").await.expect_err("test");
    assert_eq!(*attempts.0.lock().expect("test"), 1, "no retry layer");

    // Retry replaced by a counting pass-through.
    let replaced = Count::default();
    let kv = anykv::builder(&fresh("memory://layers-std"))
        .replace(StandardLayer::Retry, replaced.clone())
        .open()
        .await
        .expect("test");
    kv.set("a", "1").await.expect("test");
    assert_eq!(
        *replaced.0.lock().expect("test"),
        1,
        "the replacement is in place"
    );
}

#[tokio::test]
async fn any_store_can_be_wrapped() {
    // A driver opened on its own (here: through the registry, unlayered
    // by hand would do the same) wrapped in a stack of our choosing.
    let inner = anykv::open(&fresh("memory://layers-wrap"))
        .await
        .expect("test");
    let rec = Recorder::default();
    let kv = anykv::Kv::builder_for(Arc::new(inner))
        .layer(rec.clone())
        .build();
    kv.set("x", "1").await.expect("test");
    assert_eq!(
        kv.value("x").await.expect("test").as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(*rec.0.lock().expect("test"), [OpKind::Put, OpKind::Get]);
}

#[tokio::test(start_paused = true)]
async fn chaos_by_url() {
    let kv = anykv::open(&fresh("memory://layers-chaos?chaos=true&chaos_seed=3"))
        .await
        .expect("test");
    let switch = kv.layer::<ChaosLayer>().expect("set by URL").handle();
    kv.set("a", "1").await.expect("test");
    switch.set_unreachable(true);
    let e = kv.value("a").await.expect_err("test");
    assert!(e.never_reached_server(), "{e}");
    assert!(!kv.liveness().is_alive());
    switch.set_unreachable(false);
    kv.probe().await.expect("test");
    assert!(kv.liveness().is_alive());
    let bad = anykv::open("memory://layers-chaos?chaos_error_rate=7").await;
    assert_eq!(bad.expect_err("test").kind(), ErrorKind::InvalidUrl);
}
