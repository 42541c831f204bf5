//! [`KvBuilder`]: the standard layers, minus those dropped, plus yours.

use std::{collections::HashMap, sync::Arc, time::Duration};

use crate::{
    error::Result,
    layer::{Context, Kv, Layer, LayerConfig, RetryPolicy, StandardLayer, standard::StandardRun},
    layers,
    store::Store,
};

/// Builds a [`Kv`]: the standard layers, minus those dropped, plus yours.
///
/// Made by [`builder`](crate::builder) (from a URL) or [`Kv::builder_for`]
/// (around any [`Store`], a third-party driver included).
///
/// ```
/// # async fn demo() -> anykv_core::Result<()> {
/// use anykv_core::{RetryPolicy, StandardLayer, layers::chaos::ChaosLayer};
/// let chaos = ChaosLayer::new(7);
/// let switch = chaos.handle();
/// # let _ = (chaos, switch);
/// // With a driver linked (the `anykv` facade links memory and redb):
/// // let kv = anykv::builder("memory://t")
/// //     .layer_below(chaos)                       // faults below retry and liveness
/// //     .retry(RetryPolicy { max_attempts: 5, ..Default::default() })
/// //     .without(StandardLayer::Tracing)
/// //     .open().await?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct KvBuilder {
    source: Source,
    cfg: Option<LayerConfig>,
    timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    outer: Vec<Arc<dyn Layer>>,
    below: Vec<Arc<dyn Layer>>,
    replaced: HashMap<StandardLayer, Option<Arc<dyn Layer>>>,
}

pub(super) enum Source {
    Url(String),
    Store(Arc<dyn Store>),
}

impl KvBuilder {
    pub(crate) fn from_url(url: &str) -> Self {
        KvBuilder::with_source(Source::Url(url.to_owned()))
    }

    pub(super) fn with_source(source: Source) -> Self {
        KvBuilder {
            source,
            cfg: None,
            timeout: None,
            retry: None,
            outer: Vec::new(),
            below: Vec::new(),
            replaced: HashMap::new(),
        }
    }

    /// Adds a layer outside the standard ones: it sees each call as the
    /// caller made it (keys relative to the namespace, one `delete_prefix`),
    /// once, whatever the retries. The first added is the outermost.
    pub fn layer(mut self, layer: impl Layer) -> Self {
        self.outer.push(Arc::new(layer));
        self
    }

    /// Adds a layer between the standard ones and the driver: it sees each
    /// attempt with full keys, and what it answers is seen by timeout, retry
    /// and liveness as the driver's answer (the place for fault injection).
    /// The first added is the outermost of these.
    pub fn layer_below(mut self, layer: impl Layer) -> Self {
        self.below.push(Arc::new(layer));
        self
    }

    /// Drops a standard layer.
    pub fn without(mut self, standard: StandardLayer) -> Self {
        self.replaced.insert(standard, None);
        self
    }

    /// Puts `layer` in the place of a standard one.
    pub fn replace(mut self, standard: StandardLayer, layer: impl Layer) -> Self {
        self.replaced.insert(standard, Some(Arc::new(layer)));
        self
    }

    /// Sets the retry policy (over the URL's `?retries=`).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Sets the per-attempt timeout (over the URL's `?timeout=`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Replaces every layer setting (a URL's options are then ignored).
    pub fn config(mut self, cfg: LayerConfig) -> Self {
        self.cfg = Some(cfg);
        self
    }

    /// Connects (for a URL) and builds the handle.
    pub async fn open(self) -> Result<Kv> {
        match &self.source {
            Source::Store(driver) => {
                let driver = driver.clone();
                let cfg = self.cfg.clone().unwrap_or_default();
                Ok(self.assemble(driver, cfg))
            }
            Source::Url(url) => {
                let (driver, config, url_cfg) = crate::registry::prepare(url)?;
                let store = (driver.open)(config).await?;
                let cfg = self.cfg.clone().unwrap_or(url_cfg);
                Ok(self.assemble(store, cfg))
            }
        }
    }

    /// Builds the handle around the driver given to [`Kv::builder_for`]
    /// (a URL builder needs [`open`](Self::open): this fails with
    /// `InvalidArgument`). Starts the prober if `probe_interval` is set.
    pub fn build(self) -> Kv {
        match &self.source {
            Source::Store(driver) => {
                let driver = driver.clone();
                let cfg = self.cfg.clone().unwrap_or_default();
                self.assemble(driver, cfg)
            }
            Source::Url(url) => {
                // No driver without connecting: a store that refuses everything.
                let store = Arc::new(layers::unopened::Unopened(url.clone()));
                let cfg = self.cfg.clone().unwrap_or_default();
                self.assemble(store, cfg)
            }
        }
    }

    fn assemble(self, driver: Arc<dyn Store>, mut cfg: LayerConfig) -> Kv {
        if let Some(t) = self.timeout {
            cfg.timeout = t;
        }
        if let Some(r) = self.retry {
            cfg.retry = r;
        }
        let mut stack = self.outer;
        // Consecutive standard layers run fused; a replacement splits them.
        let mut run: Option<StandardRun> = None;
        for standard in StandardLayer::ORDER {
            match self.replaced.get(&standard) {
                None => run.get_or_insert_with(StandardRun::default).add(standard),
                Some(Some(layer)) => {
                    if let Some(run) = run.take() {
                        stack.push(Arc::new(run));
                    }
                    stack.push(layer.clone());
                }
                Some(None) => {}
            }
        }
        if let Some(run) = run {
            stack.push(Arc::new(run));
        }
        stack.extend(self.below);
        if let Some(chaos) = &cfg.chaos {
            stack.push(Arc::new(layers::chaos::ChaosLayer::from_config(chaos)));
        }
        let kv = Kv::from_context(Context::new(driver, stack.into(), cfg, true));
        if let Some(every) = kv.config().probe_interval {
            kv.start_prober(every);
        }
        kv
    }
}
