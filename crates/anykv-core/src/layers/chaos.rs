//! Fault injection for your own tests (after OpenDAL's `ChaosLayer`).
//!
//! Placed below the standard layers (with
//! [`KvBuilder::layer_below`](crate::KvBuilder::layer_below), or by URL), so
//! that timeout, retry and liveness see its faults as the driver's:
//! - an error rate per operation kind (seeded: the same seed fails the same
//!   calls): a failure is `Unavailable` that may have reached the server, so
//!   idempotent operations are retried and writes are not;
//! - added latency before each operation (it counts against the timeout);
//! - a switch, [`ChaosHandle::set_unreachable`], that makes the store
//!   unreachable until turned back: every operation, `probe` included,
//!   fails with the `Unavailable` of a refused connection
//!   ([`never_reached_server`](crate::Error::never_reached_server) is true),
//!   so retries and liveness react exactly as to a real outage, and open
//!   watches deliver nothing until it is turned back.
//!
//! By URL (any driver), options stripped before the driver sees them:
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `chaos=true` | enable with no faults (the switch only) | off |
//! | `chaos_error_rate=0.1` | share of operations that fail | 0 |
//! | `chaos_error_ops=get,put` | the operations the rate applies to | all but `close` |
//! | `chaos_latency=5ms` | latency added to each operation | 0 |
//! | `chaos_seed=7` | RNG seed | 0 |
//! | `chaos_unreachable=true` | start unreachable | false |
//!
//! Any `chaos_*` option enables the layer. Its switch is reached with
//! `kv.layer::<ChaosLayer>()`.
//!
//! ```
//! # fn demo(driver: std::sync::Arc<dyn anykv_core::Store>) {
//! use anykv_core::{Kv, OpKind, layers::chaos::ChaosLayer};
//! let chaos = ChaosLayer::new(7)
//!     .error_rate(0.01)
//!     .error_rate_for(OpKind::Put, 0.2)
//!     .latency(std::time::Duration::from_millis(2));
//! let switch = chaos.handle();
//! let kv = Kv::builder_for(driver).layer_below(chaos).build();
//! switch.set_unreachable(true); // liveness goes false; retries fire
//! switch.set_unreachable(false);
//! # let _ = kv; }
//! ```

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    config::Config,
    error::{Error, Result},
    layer::{Layer, Next},
    layers::request::{OpKind, Request, Response},
};

/// URL options of the chaos layer.
pub const CHAOS_PARAMS: &[&str] = &[
    "chaos",
    "chaos_error_rate",
    "chaos_error_ops",
    "chaos_latency",
    "chaos_seed",
    "chaos_unreachable",
];

/// Settings of a [`ChaosLayer`], from a URL or built by hand.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChaosConfig {
    /// Error rate of every operation not in `error_rates` (0 to 1).
    pub error_rate: f64,
    /// Error rates of given operations, over `error_rate`.
    pub error_rates: Vec<(OpKind, f64)>,
    /// Latency added before each operation.
    pub latency: Duration,
    /// RNG seed.
    pub seed: u64,
    /// Start unreachable.
    pub unreachable: bool,
}

impl ChaosConfig {
    /// The chaos settings of a URL (`None`: no chaos option given).
    pub fn from_url(config: &Config) -> Result<Option<ChaosConfig>> {
        if !CHAOS_PARAMS.iter().any(|p| config.param(p).is_some()) {
            return Ok(None);
        }
        if config.bool_param("chaos")? == Some(false) {
            return Ok(None);
        }
        let rate = config
            .parse_param::<f64>("chaos_error_rate")?
            .unwrap_or(0.0);
        if !(0.0..=1.0).contains(&rate) {
            return Err(config.invalid("chaos_error_rate must be between 0 and 1"));
        }
        let mut cfg = ChaosConfig {
            latency: config.duration_param("chaos_latency")?.unwrap_or_default(),
            seed: config.parse_param("chaos_seed")?.unwrap_or(0),
            unreachable: config.bool_param("chaos_unreachable")?.unwrap_or(false),
            ..ChaosConfig::default()
        };
        match config.param("chaos_error_ops") {
            None => cfg.error_rate = rate,
            Some(ops) => {
                for name in ops.split(',').filter(|n| !n.is_empty()) {
                    let kind = OpKind::ALL
                        .iter()
                        .find(|k| k.name() == name)
                        .ok_or_else(|| {
                            config.invalid(format!("chaos_error_ops: unknown operation {name:?}"))
                        })?;
                    cfg.error_rates.push((*kind, rate));
                }
            }
        }
        Ok(Some(cfg))
    }
}

/// Injects errors, latency and outages below the standard layers.
pub struct ChaosLayer {
    rates: [f64; OpKind::ALL.len()],
    latency: Duration,
    rng: Mutex<StdRng>,
    handle: ChaosHandle,
}

/// The switch of a [`ChaosLayer`], and its counts.
#[derive(Clone, Debug)]
pub struct ChaosHandle(Arc<ChaosState>);

#[derive(Debug)]
struct ChaosState {
    unreachable: tokio::sync::watch::Sender<bool>,
    injected: AtomicU64,
}

impl ChaosHandle {
    /// Makes the store unreachable (`true`) until turned back (`false`).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.0.unreachable.send_replace(unreachable);
    }

    /// Whether the store is switched unreachable.
    pub fn is_unreachable(&self) -> bool {
        *self.0.unreachable.borrow()
    }

    /// How many operations failed by the error rate so far.
    pub fn injected(&self) -> u64 {
        self.0.injected.load(Ordering::Relaxed)
    }
}

impl ChaosLayer {
    /// A layer that injects nothing yet, with RNG seed `seed`.
    pub fn new(seed: u64) -> Self {
        ChaosLayer {
            rates: [0.0; OpKind::ALL.len()],
            latency: Duration::ZERO,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            handle: ChaosHandle(Arc::new(ChaosState {
                unreachable: tokio::sync::watch::Sender::new(false),
                injected: AtomicU64::new(0),
            })),
        }
    }

    /// Built from settings (a URL's).
    pub fn from_config(cfg: &ChaosConfig) -> Self {
        let mut layer = ChaosLayer::new(cfg.seed)
            .error_rate(cfg.error_rate)
            .latency(cfg.latency);
        for (kind, rate) in &cfg.error_rates {
            layer = layer.error_rate_for(*kind, *rate);
        }
        layer.handle.set_unreachable(cfg.unreachable);
        layer
    }

    /// Fails this share (0 to 1) of every operation but `close`.
    pub fn error_rate(mut self, rate: f64) -> Self {
        for kind in OpKind::ALL {
            if *kind != OpKind::Close {
                self.rates[*kind as usize] = rate.clamp(0.0, 1.0);
            }
        }
        self
    }

    /// Fails this share (0 to 1) of one operation kind.
    pub fn error_rate_for(mut self, kind: OpKind, rate: f64) -> Self {
        self.rates[kind as usize] = rate.clamp(0.0, 1.0);
        self
    }

    /// Adds `latency` before each operation.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// The switch and counts of this layer.
    pub fn handle(&self) -> ChaosHandle {
        self.handle.clone()
    }

    fn draw(&self, kind: OpKind) -> bool {
        let rate = self.rates[kind as usize];
        rate > 0.0
            && self
                .rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .random::<f64>()
                < rate
    }
}

#[async_trait]
impl Layer for ChaosLayer {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
        let backend = next.context().backend();
        if matches!(req, Request::Close) {
            return next.run(req).await;
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.handle.is_unreachable() {
            let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
            return Err(Error::not_sent(backend, "chaos: unreachable", refused));
        }
        if self.draw(req.kind()) {
            self.handle.0.injected.fetch_add(1, Ordering::Relaxed);
            return Err(Error::unavailable(
                backend,
                format!("chaos: injected {} error", req.name()),
                "injected",
            ));
        }
        match next.run(req).await? {
            // An open watch delivers nothing while the store is unreachable.
            Response::Watch(s) => {
                let rx = self.handle.0.unreachable.subscribe();
                Ok(Response::Watch(
                    futures::stream::unfold((s, rx), |(mut s, mut rx)| async move {
                        let item = s.next().await?;
                        let _ = rx.wait_for(|u| !*u).await;
                        Some((item, (s, rx)))
                    })
                    .boxed(),
                ))
            }
            other => Ok(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::StreamExt;

    use super::*;
    use crate::{
        Key, Kv, LayerConfig, StandardLayer, Start, Store, Target, error::ErrorKind,
        layers::test_store::TestStore,
    };

    fn k() -> Key {
        Key::new("k").unwrap()
    }

    /// Failures of `n` gets through a chaos layer of `rate` (no retries).
    async fn failures(seed: u64, rate: f64, n: u32) -> (u32, Vec<bool>) {
        let store = TestStore::new();
        let kv = Kv::builder_for(store.clone())
            .without(StandardLayer::Retry)
            .layer_below(ChaosLayer::new(seed).error_rate(rate))
            .build();
        let mut pattern = Vec::new();
        for _ in 0..n {
            pattern.push(kv.get(&k()).await.is_err());
        }
        let failed = pattern.iter().filter(|f| **f).count() as u32;
        assert_eq!(
            store.calls(),
            n - failed,
            "a failed call never reaches the driver"
        );
        assert_eq!(
            kv.layer::<ChaosLayer>().unwrap().handle().injected(),
            failed as u64
        );
        (failed, pattern)
    }

    #[tokio::test]
    async fn the_error_rate_is_honoured_and_seeded() {
        // 10,000 draws at 10 %: σ = 30, so ±4σ fails a fair RNG once in 15,000 seeds.
        let (failed, pattern) = failures(7, 0.1, 10_000).await;
        assert!((880..=1120).contains(&failed), "{failed} failures");
        let (_, again) = failures(7, 0.1, 10_000).await;
        assert_eq!(pattern, again, "same seed, same failures");
        let (other, _) = failures(8, 0.1, 10_000).await;
        assert!((880..=1120).contains(&other), "{other} failures");
    }

    #[tokio::test]
    async fn rates_apply_per_operation_kind() {
        let store = TestStore::new();
        let kv = Kv::builder_for(store.clone())
            .without(StandardLayer::Retry)
            .layer_below(ChaosLayer::new(1).error_rate_for(OpKind::Put, 1.0))
            .build();
        for _ in 0..100 {
            kv.get(&k()).await.expect("gets never fail");
            let e = kv.put(&k(), "v".into(), Default::default()).await;
            let e = e.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unavailable);
            assert!(
                !e.never_reached_server(),
                "an injected error may have been applied"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_switch_makes_liveness_go_false_then_true() {
        let store = TestStore::new();
        let chaos = ChaosLayer::new(0);
        let switch = chaos.handle();
        let cfg = LayerConfig {
            probe_interval: Some(std::time::Duration::from_secs(1)),
            ..LayerConfig::default()
        };
        let kv = Kv::builder_for(store.clone())
            .config(cfg)
            .layer_below(chaos)
            .build();
        let mut states = kv.liveness().subscribe();
        assert_eq!(states.next().await, Some(false));
        assert_eq!(states.next().await, Some(true), "first probe");
        let mut watch = kv
            .watch(Target::Prefix(crate::Prefix::root()), Start::Now)
            .await
            .unwrap();
        switch.set_unreachable(true);
        let calls = store.calls();
        let e = kv.get(&k()).await.unwrap_err();
        assert!(e.never_reached_server(), "a refused connection: {e}");
        assert_eq!(store.calls(), calls, "nothing reaches the driver");
        assert_eq!(states.next().await, Some(false), "outage seen");
        let outage = watch.next().await.unwrap().unwrap_err();
        assert_eq!(
            outage.kind(),
            ErrorKind::Unavailable,
            "the watch reports it"
        );
        switch.set_unreachable(false);
        assert_eq!(states.next().await, Some(true), "and the recovery");
        kv.get(&k()).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn unreachable_writes_are_retried_as_never_sent() {
        let store = TestStore::new();
        let chaos = ChaosLayer::new(0);
        let switch = chaos.handle();
        let kv = Kv::builder_for(store.clone()).layer_below(chaos).build();
        switch.set_unreachable(true);
        let put = {
            let kv = kv.clone();
            tokio::spawn(async move { kv.put(&k(), "v".into(), Default::default()).await })
        };
        // The first attempt is refused; switch back during the 50 ms backoff.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        switch.set_unreachable(false);
        put.await.unwrap().expect("the retry succeeds");
        assert_eq!(store.calls(), 1);
    }

    #[test]
    fn url_options() {
        let url = "memory://t?chaos_error_rate=0.1&chaos_latency=5ms&chaos_seed=7&chaos_error_ops=get,put";
        let c = ChaosConfig::from_url(&Config::parse(url).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(c.seed, 7);
        assert_eq!(c.latency, Duration::from_millis(5));
        assert_eq!(c.error_rates, [(OpKind::Get, 0.1), (OpKind::Put, 0.1)]);
        let off = Config::parse("memory://t?timeout=1s").unwrap();
        assert_eq!(ChaosConfig::from_url(&off).unwrap(), None);
        let on = Config::parse("memory://t?chaos=true").unwrap();
        assert_eq!(
            ChaosConfig::from_url(&on).unwrap(),
            Some(ChaosConfig::default())
        );
        for bad in [
            "chaos_error_rate=2",
            "chaos_error_ops=gett",
            "chaos_latency=soon",
        ] {
            let c = Config::parse(&format!("memory://t?{bad}")).unwrap();
            assert!(ChaosConfig::from_url(&c).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_watch_delivers_nothing_while_unreachable() {
        let store = TestStore::new();
        let chaos = ChaosLayer::new(0);
        let switch = chaos.handle();
        let kv = Kv::builder_for(store.clone()).layer_below(chaos).build();
        let mut w = kv.watch(Target::Key(k()), Start::Now).await.unwrap();
        switch.set_unreachable(true);
        let tx = store.events.lock().unwrap()[0].clone();
        tx.send(Ok(crate::Event::Delete {
            key: k(),
            revision: 2,
        }))
        .unwrap();
        let held = tokio::time::timeout(std::time::Duration::from_millis(50), w.next()).await;
        assert!(held.is_err(), "held while unreachable");
        switch.set_unreachable(false);
        assert!(matches!(
            w.next().await,
            Some(Ok(crate::Event::Delete { .. }))
        ));
        let _ = Arc::strong_count(&store);
    }
}
